"""The QMP gate in front of QEMU: the launcher (the executable libvirt starts as the
emulator), the sans-I/O QMP session, the proxy's I/O, and QEMU's usb-host arguments parsed
as QEMU parses them. A front end: imports the floors below (vocabulary, host, inspect,
handover) and safeusbd's client."""
