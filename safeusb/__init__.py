"""safeusb: make USB passthrough to QEMU/libvirt guests safe."""

__version__ = "0.1.0"
