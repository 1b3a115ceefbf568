"""The system boundary: every read of the running system or of a recording (sysfs, /proc,
debugfs, BPF iterators, netlink) into the frozen model (model.py), and every change
(runner, kernel guard, libvirt, state files); safeusb's own paths (defaults.py) and where
log lines go (logsetup.py). Imports the shared vocabulary (safeusb's top-level errors,
reasons, textout, strictjson, trust, hostdev) and nothing above."""
