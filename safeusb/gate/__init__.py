"""The QMP gate in front of QEMU: the proxy and launcher, the QMP session it reads, and
QEMU's usb-host arguments parsed as QEMU parses them. A front end: may import any floor
below it (vocabulary, host, inspect, handover) and safeusbd's client."""
