"""The pure decision over a read system: what keeps a device busy, as typed reasons, and
how they are told. Imports the shared vocabulary and safeusb.host's model readers."""
