"""safeusb: make USB passthrough to QEMU/libvirt guests safe.

Floors, each importing only those before it: the shared vocabulary here (errors, reasons,
textout, strictjson, trust, hostdev, values); host/ (the system boundary: the frozen model, every
read and every change); inspect/ (the pure decision); handover/ (policy, plan, steps,
the service); then the front ends: gate/, safeusbd/ and the commands here (cli, hook,
attach, protect, status, install, confinement, udevrules, domain, demo and its lab/).
"""

__version__ = "0.1.0"
