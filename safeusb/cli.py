"""The safeusb command line. Exit codes: 0 free/done, 1 in use or refused, 2 usage."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import __version__
from .errors import EXIT_FREE, EXIT_IN_USE, SafeUSBError, UsageError, XMLError, exit_code_for
from .inspect import inspect
from .model import Target
from .report import as_json, as_text
from .roots import Roots
from .run import Runner, setup_logging
from .selector import Selector, resolve
from .snapshot import read_snapshot

if TYPE_CHECKING:
    from .act import Outcome
    from .policy import Policy

# Paths known here so the parser needs no policy or state code (loaded per command).
DEFAULT_POLICY = "/etc/safeusb/policy.toml"
DEFAULT_STATE_DIR = "/run/safeusb"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _timeout(text: str) -> float:
    from .policy import check_timeout  # noqa: PLC0415 (policy code only when acting)

    try:
        return check_timeout(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="safeusb", description="Make USB passthrough to QEMU/libvirt guests safe.")
    p.add_argument("--version", action="version", version=f"safeusb {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step to stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    ins = sub.add_parser(
        "inspect",
        help="tell everything the host does with a USB device",
        description="Tell everything the host does with a USB device. Exit 0: nothing uses "
        "it, it can be handed over now; 1: in use or not provably free; 2: bad selector.",
    )
    add_selector_arguments(ins)
    ins.add_argument("--json", action="store_true", help="machine-readable output")

    for name, text in (
        ("prepare", "make a device free for a guest by the policy (flush, unmount, tear "
                    "down, unbind), or refuse with the reasons"),
        ("release", "give a device back to the host: rebind its drivers and, with "
                    "restore = true, reactivate and remount what prepare took"),
    ):
        sp = sub.add_parser(name, help=text.split(":")[0], description=text.capitalize() + ".")
        add_selector_arguments(sp)
        sp.add_argument("--policy", metavar="FILE", default=DEFAULT_POLICY,
                        help=f"policy file (default {DEFAULT_POLICY})")
        sp.add_argument("--domain", metavar="NAME", help="the libvirt domain it is for")
        sp.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR,
                        help=argparse.SUPPRESS)
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "prepare":
            sp.add_argument("--dry-run", action="store_true",
                            help="print the plan, change nothing")
            sp.add_argument("--timeout", type=_timeout, metavar="SECONDS",
                            help="flush timeout (default: the policy's flush_timeout)")

    st = sub.add_parser("status", help="every USB device, what uses it, which domains want it",
                        description="Every USB device on the host as a tree, what the host "
                        "does with each, whether handing it to a guest is safe now, and "
                        "which libvirt domains reference it.")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("-c", "--connect", metavar="URI", help="libvirt URI (read-only)")

    dm = sub.add_parser("demo", help="show the problem and the fix on a real kernel",
                        description="Boot a Debian kernel under QEMU with two USB sticks, "
                        "libvirtd and a guest; hand each mounted stick with fresh data to the "
                        "guest, without and with safeusb; read both back from outside.")
    dm.add_argument("--keep", action="store_true", help="keep the logs and images")

    for cmd, text in (("attach-device", "attach a device to a domain as virsh does, preparing "
                                         "its USB host devices first"),
                      ("detach-device", "detach a device from a domain as virsh does, then "
                                         "give its USB host devices back to the host")):
        ap = sub.add_parser(cmd, help=text, description=text.capitalize() + ".")
        ap.add_argument("domain")
        ap.add_argument("file", help="device XML, as for virsh")
        for flag in ("live", "config", "current", "persistent"):
            ap.add_argument(f"--{flag}", action="store_true")
        ap.add_argument("-c", "--connect", metavar="URI", help="libvirt URI")
        ap.add_argument("--policy", metavar="FILE", default=DEFAULT_POLICY)
        ap.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR,
                        help=argparse.SUPPRESS)

    for cmd, text in (("install-hook", "install the libvirt QEMU hook drop-in "
                                        "(/etc/libvirt/hooks/qemu.d/safeusb)"),
                      ("uninstall-hook", "remove the libvirt QEMU hook drop-in")):
        hp = sub.add_parser(cmd, help=text, description=text.capitalize() + ".")
        hp.add_argument("--root", metavar="DIR", default="/",
                        help="install below DIR (DESTDIR-style, for packaging)")
        if cmd == "install-hook":
            hp.add_argument("--python", metavar="PATH",
                            help="interpreter the hook runs (default: this one)")
            hp.add_argument("--site", metavar="DIR", action="append",
                            help="packaging: the directory safeusb is installed in on the "
                                 "target system (e.g. /usr/lib/python3/dist-packages); "
                                 "repeat it for its dependencies' directories. The drop-in "
                                 "then does nothing once the package is removed")

    for cmd, text in (("install-confinement", "put safeusb's rules into libvirt's AppArmor "
                                               "profiles (/etc/apparmor.d/local) and reload "
                                               "libvirtd's"),
                      ("uninstall-confinement", "take safeusb's rules out of libvirt's "
                                                "AppArmor profiles")):
        cp = sub.add_parser(cmd, help=text, description=text.capitalize() + ".")
        cp.add_argument("--root", metavar="DIR", default="/",
                        help="below DIR (DESTDIR-style, for packaging; nothing is reloaded)")
        if cmd == "install-confinement":
            cp.add_argument("--print", action="store_true", dest="print_only",
                            help="print the rules for this installation, change nothing")

    for cmd, text in (("protect", "guard live USB hotplug into a domain with the gate"),
                      ("unprotect", "give a protected domain its real emulator back")):
        pp = sub.add_parser(cmd, help=text, description=text.capitalize() + ".")
        pp.add_argument("domain")
        pp.add_argument("-c", "--connect", metavar="URI", help="libvirt URI (default: libvirt's)")
    return p


def add_selector_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "selector",
        nargs="?",
        help="2-1 (sysfs name), 002:003 (BUS:DEV), 46f4:0001 (VENDOR:PRODUCT), "
        "/dev/sda, /dev/sda1, /dev/bus/usb/002/003",
    )
    p.add_argument("--xml", metavar="FILE", help="a file holding a libvirt USB <hostdev>")


def target_from_args(args: argparse.Namespace, roots: Roots) -> Target:
    if (args.selector is None) == (args.xml is None):
        raise UsageError("give exactly one of SELECTOR or --xml FILE")
    if args.xml is not None:
        try:
            with open(args.xml, "rb") as f:
                data = f.read(16 * 1024 * 1024 + 1)
        except OSError as exc:
            raise XMLError(args.xml, exc.strerror or str(exc)) from None
        from .hostdev import usb_hostdevs  # noqa: PLC0415 (lxml only when XML is given)

        hostdevs = usb_hostdevs(data, args.xml)
        if len(hostdevs) != 1:
            raise XMLError(args.xml, f"holds {len(hostdevs)} USB host devices; give one")
        return resolve(Selector.from_hostdev(hostdevs[0], args.xml), roots)
    return resolve(Selector.from_string(args.selector), roots)


def cmd_inspect(args: argparse.Namespace, roots: Roots) -> int:
    target = target_from_args(args, roots)
    findings = inspect(read_snapshot(roots, target, Runner()))
    if args.json:
        json.dump(as_json(findings), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(as_text(findings))
    return EXIT_FREE if findings.free else EXIT_IN_USE


def _print_outcome(verb: str, head: str, outcome: Outcome, as_json: bool) -> int:
    if as_json:
        json.dump(outcome.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_FREE if outcome.ok else EXIT_IN_USE
    plan = outcome.plan
    out = sys.stdout if outcome.ok else sys.stderr
    lines: list[str] = []
    if plan is not None and plan.refused:
        lines.append(f"safeusb: refused to hand over {head}:")
        lines.extend("  " + r for r in plan.refusals)
    elif outcome.error:
        lines.append(f"safeusb: could not {verb} {head}: {outcome.error}")
        lines.extend("  undone: " + u for u in outcome.undone)
        lines.extend("  NOT undone: " + u for u in outcome.not_undone)
        lines.append(f"  host state: {outcome.host_state()}")
    elif plan is not None and not outcome.done:
        lines.append(f"plan for {head} ({plan.rule}):")
        lines.extend(f"  {i}. {s.describe()}" for i, s in enumerate(plan.steps, 1))
    else:
        lines.append(f"{head}: " + ("ready for the guest" if verb == "prepare"
                                    else "given back to the host"))
        lines.extend("  done: " + d for d in outcome.done)
        lines.extend("  NOT done: " + u for u in outcome.not_undone)
    lines.extend("  note: " + n for n in outcome.notes)
    out.write("\n".join(lines) + "\n")
    return EXIT_FREE if outcome.ok else EXIT_IN_USE


def cmd_prepare(args: argparse.Namespace, roots: Roots) -> int:
    from .act import prepare  # noqa: PLC0415 (the acting code only when acting)
    from .policy import Policy  # noqa: PLC0415
    from .run import stderr_progress  # noqa: PLC0415
    from .state import StateDir  # noqa: PLC0415

    target = target_from_args(args, roots)
    policy = Policy.from_file(args.policy)
    runner = Runner.for_roots(roots, dry_run=args.dry_run, progress=stderr_progress)
    outcome = prepare(roots, target, policy, runner, StateDir(args.state_dir),
                      domain=args.domain, timeout=args.timeout)
    return _print_outcome("prepare", target.describe(), outcome, args.json)


def cmd_release(args: argparse.Namespace, roots: Roots) -> int:
    from .act import release, target_key  # noqa: PLC0415
    from .state import StateDir  # noqa: PLC0415

    target = target_from_args(args, roots)
    runner = Runner.for_roots(roots)
    outcome = release(roots, target_key(target), _policy_or_none(args.policy), runner,
                      StateDir(args.state_dir),
                      usb=target.usb, domain=args.domain)
    return _print_outcome("release", target.describe(), outcome, args.json)


def _policy_or_none(path: str) -> Policy | None:
    """Giving back never depends on the policy: when it cannot be read, say so and go on
    by the records (which keep the restore setting the device was taken under)."""
    from .policy import Policy  # noqa: PLC0415

    try:
        return Policy.from_file(path)
    except SafeUSBError as exc:
        print(f"safeusb: {exc}; giving back by the records alone", file=sys.stderr)
        return None


def cmd_install_hook(args: argparse.Namespace, roots: Roots) -> int:
    from . import install  # noqa: PLC0415

    if args.command == "install-hook":
        print(install.install(args.root, args.python, sites=args.site)
              .describe("installed"))
    else:
        print(install.uninstall(args.root).describe("removed"))
    return EXIT_FREE


def cmd_confinement(args: argparse.Namespace, roots: Roots) -> int:
    from . import confinement  # noqa: PLC0415

    if args.command == "uninstall-confinement":
        lines = confinement.uninstall(args.root)
    elif args.print_only:
        blocks = confinement.render(confinement.Paths.of_this_installation())
        lines = [f"# /etc/apparmor.d/{rel}\n{body}" for rel, body in blocks.items()]
    else:
        lines = confinement.install(args.root)
    print("\n".join(lines))
    return EXIT_FREE


def cmd_attach(args: argparse.Namespace, roots: Roots) -> int:
    from . import attach  # noqa: PLC0415
    from .policy import Policy  # noqa: PLC0415
    from .state import StateDir  # noqa: PLC0415

    try:
        with open(args.file, "rb") as f:
            xml = f.read(16 * 1024 * 1024 + 1)
    except OSError as exc:
        raise XMLError(args.file, exc.strerror or str(exc)) from None
    flags = attach.Flags(args.live, args.config, args.current, args.persistent)
    if args.command == "attach-device":
        lines = attach.attach(roots, args.connect, args.domain, xml, args.file, flags,
                              Policy.from_file(args.policy), StateDir(args.state_dir))
    else:
        lines = attach.detach(roots, args.connect, args.domain, xml, args.file, flags,
                              _policy_or_none(args.policy), StateDir(args.state_dir))
    print("\n".join(lines))
    return EXIT_FREE


def cmd_status(args: argparse.Namespace, roots: Roots) -> int:
    from .status import collect  # noqa: PLC0415

    status = collect(roots, args.connect)
    if args.json:
        json.dump(status.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(status.as_text())
    return EXIT_FREE


def cmd_demo(args: argparse.Namespace, roots: Roots) -> int:
    from . import demo  # noqa: PLC0415

    return demo.main(args.keep)


COMMANDS = {"demo": cmd_demo, "status": cmd_status, "attach-device": cmd_attach,
            "detach-device": cmd_attach, "inspect": cmd_inspect, "prepare": cmd_prepare,
            "release": cmd_release,
            "install-hook": cmd_install_hook, "uninstall-hook": cmd_install_hook,
            "install-confinement": cmd_confinement, "uninstall-confinement": cmd_confinement}


def main(argv: Sequence[str] | None = None, roots: Roots | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        acting = args.command in ("prepare", "release", "protect", "unprotect",
                                  "attach-device", "detach-device")
        setup_logging(logging.INFO if (args.verbose or acting) else logging.WARNING, acting)
        if args.command in ("protect", "unprotect"):
            from . import protect  # noqa: PLC0415

            return protect.run(args)
        return COMMANDS[args.command](args, roots or Roots.host())
    except SafeUSBError as exc:
        print(f"safeusb: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        print("safeusb: interrupted", file=sys.stderr)
        return EXIT_IN_USE
    except Exception as exc:  # one line for the user; the trace with -v
        logging.getLogger("safeusb").debug("internal error", exc_info=True)
        print(f"safeusb: internal error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return EXIT_IN_USE


if __name__ == "__main__":
    sys.exit(main())
