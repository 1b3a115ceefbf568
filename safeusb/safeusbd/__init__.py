"""safeusbd, the privileged decision service: the server, its wire protocol and client, who
is asking (peer), udev and libvirt events, auto-attach. A front end: imports the floors
below (vocabulary, host, inspect, handover) and the commands it serves (protect, attach)."""
