"""The real-kernel lab: boot a Debian kernel under QEMU with emulated USB devices (harness)
and the guest's driver scripts (guest/), for `safeusb demo` and the VM test tier.
Imports only the standard library; nothing of safeusb imports it but the demo."""
