"""Where safeusb looks by default: the policy file, the state directory (the records of
what prepare took, and the guard's state) and safeusbd's socket. Imports nothing."""

POLICY = "/etc/safeusb/policy.toml"
STATE_DIR = "/run/safeusb"
SOCKET = "/run/safeusb/safeusbd.sock"
