"""The system boundary: every read of the running system or of a recording (sysfs, /proc,
debugfs, BPF iterators, netlink) into the frozen model, and every change (runner, kernel
guard, state files). Imports the shared vocabulary (safeusb's top-level errors, model,
reasons, textout, defaults, strictjson, logsetup, trust, hostdev) and nothing above."""
