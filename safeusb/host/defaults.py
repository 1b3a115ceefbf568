"""Where safeusb looks by default: the policy file, the state directory (the records of
what prepare took, and the guard's state) and safeusbd's socket; and where the programs
beside it keep theirs (udevd's control socket, libvirt's QEMU pid files). Imports
nothing."""

POLICY = "/etc/safeusb/policy.toml"
STATE_DIR = "/run/safeusb"
SOCKET = "/run/safeusb/safeusbd.sock"
UDEV_CONTROL = "/run/udev/control"
LIBVIRT_QEMU_PIDS = "/run/libvirt/qemu"
