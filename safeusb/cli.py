"""The safeusb command line. Exit codes: 0 free/done, 1 in use or refused, 2 usage."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from safeusb import __version__
from safeusb.errors import EXIT_FREE, EXIT_IN_USE, SafeUSBError, UsageError, XMLError, exit_code_for
from safeusb.host import defaults
from safeusb.host.logsetup import setup_logging
from safeusb.host.roots import DEV, Roots

# Each command imports what it uses when it runs: `inspect` pays for no acting, policy,
# libvirt or network code at start-up.
if TYPE_CHECKING:
    from safeusb.handover.service import Handover
    from safeusb.handover.transaction import Outcome
    from safeusb.host.model import Target

# From defaults.py, so that the parser needs no policy or state code (loaded per command).
DEFAULT_POLICY = defaults.POLICY
DEFAULT_STATE_DIR = defaults.STATE_DIR
DEFAULT_SOCKET = defaults.SOCKET
DAEMON_TIMEOUT = 60.0  # seconds for safeusbd's answer before the host is read here


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _timeout(text: str) -> float:
    from safeusb.handover.policy import check_timeout  # noqa: PLC0415 (policy code only when acting)

    try:
        return check_timeout(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Skipped:
    """A command that is not built. Building each costs argparse some milliseconds at
    every start (it looks up message translations for each), so main builds only the
    command given. Takes its arguments and does nothing."""

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        pass


_Adds = argparse.ArgumentParser | _Skipped


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line; with ``only``, that command alone (the others are not built)."""
    p = _Parser(prog="safeusb", description="Make USB passthrough to QEMU/libvirt guests safe.")
    p.add_argument("--version", action="version", version=f"safeusb {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step to stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add_parser(name: str, **kwargs: Any) -> _Adds:
        return sub.add_parser(name, **kwargs) if only in (None, name) else _Skipped()

    ins = add_parser(
        "inspect",
        help="tell everything the host does with a USB device",
        description="Tell everything the host does with a USB device. Exit 0: nothing uses "
        "it, it can be handed over now; 1: in use or not provably free; 2: bad selector.",
    )
    add_selector_arguments(ins)
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    add_daemon_arguments(ins)

    for name, text in (
        ("prepare", "make a device free for a guest by the policy (flush, unmount, tear "
                    "down, unbind), or refuse with the reasons"),
        ("release", "give a device back to the host: rebind its drivers and, with "
                    "restore = true, reactivate and remount what prepare took"),
    ):
        sp = add_parser(name, help=text.split(":")[0], description=text.capitalize() + ".")
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

    gd = add_parser(
        "guard", help="the kernel guard: refuse every detach of a USB stick's driver",
        description="The kernel guard (BPF LSM): refuse, with EBUSY, every detach of "
        "usb-storage/uas from a USB interface (usbfs, sysfs unbind/authorized/remove) "
        "unless safeusb hands the device over; safeusbd logs each refusal and prepares an "
        "idle device by the policy so that the next attempt passes. enable and disable "
        "need root. Exit codes of status: 0 on, 3 off, 4 not available on this kernel "
        "(the reason and the boot parameter are printed).")
    gd.add_argument("action", choices=("enable", "disable", "status"))
    gd.add_argument("--json", action="store_true", help="machine-readable output")
    gd.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR,
                    help=argparse.SUPPRESS)

    st = add_parser("status", help="every USB device, what uses it, which domains want it",
                        description="Every USB device on the host as a tree, what the host "
                        "does with each, whether handing it to a guest is safe now, and "
                        "which libvirt domains reference it.")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("-c", "--connect", metavar="URI", help="libvirt URI (read-only)")
    st.add_argument("--policy", metavar="FILE", default=DEFAULT_POLICY,
                    help=f"policy file whose attach_to rules are shown (default "
                    f"{DEFAULT_POLICY})")
    st.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR,
                    help=argparse.SUPPRESS)
    add_daemon_arguments(st)

    dm = add_parser("demo", help="show the problem and the fix on a real kernel",
                        description="Boot a Debian kernel under QEMU with two USB sticks, "
                        "libvirtd and a guest; hand each mounted stick with fresh data to the "
                        "guest, without and with safeusb; read both back from outside.")
    dm.add_argument("--keep", action="store_true", help="keep the logs and images")

    for cmd, text in (("attach-device", "attach a device to a domain as virsh does, preparing "
                                         "its USB host devices first"),
                      ("detach-device", "detach a device from a domain as virsh does, then "
                                         "give its USB host devices back to the host")):
        ap = add_parser(cmd, help=text, description=text.capitalize() + ".")
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
        hp = add_parser(cmd, help=text, description=text.capitalize() + ".")
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
        cp = add_parser(cmd, help=text, description=text.capitalize() + ".")
        cp.add_argument("--root", metavar="DIR", default="/",
                        help="below DIR (DESTDIR-style, for packaging; nothing is reloaded)")
        if cmd == "install-confinement":
            cp.add_argument("--print", action="store_true", dest="print_only",
                            help="print the rules for this installation, change nothing")

    up = add_parser("install-udev-rules",
                    help="write the udev rules that keep the host off devices the policy "
                    "hands to a domain (attach_to)",
                    description="Write /etc/udev/rules.d/10-safeusb-attach.rules from the "
                    "policy's attach_to rules: their devices' block devices are marked so "
                    "that udisks and systemd neither mount nor use them, then udevd reads "
                    "its rules again. Run it again after changing the policy.")
    up.add_argument("--policy", metavar="FILE", default=DEFAULT_POLICY,
                    help=f"policy file (default {DEFAULT_POLICY})")
    up.add_argument("--root", metavar="DIR", default="/",
                    help="below DIR (DESTDIR-style, for packaging; udev is not reloaded)")
    up.add_argument("--print", action="store_true", dest="print_only",
                    help="print the rules, change nothing")

    for cmd, text in (("protect", "guard live USB hotplug into a domain with the gate"),
                      ("unprotect", "give a protected domain its real emulator back")):
        pp = add_parser(cmd, help=text, description=text.capitalize() + ".")
        pp.add_argument("domain", nargs="?" if cmd == "protect" else None)
        if cmd == "protect":
            pp.add_argument("--all", action="store_true",
                            help="every defined domain (those already protected are said "
                            "to be)")
        pp.add_argument("-c", "--connect", metavar="URI", help="libvirt URI (default: libvirt's)")
    return p


def add_selector_arguments(p: _Adds) -> None:
    p.add_argument(
        "selector",
        nargs="?",
        help="2-1 (sysfs name), 002:003 (BUS:DEV), 46f4:0001 (VENDOR:PRODUCT), "
        f"{DEV}/sda, {DEV}/sda1, {DEV}/bus/usb/002/003",
    )
    p.add_argument("--xml", metavar="FILE", help="a file holding a libvirt USB <hostdev>")


def add_daemon_arguments(p: _Adds) -> None:
    p.add_argument("--local", action="store_true",
                   help="read the host in this process; by default a running safeusbd is "
                   "asked, and the host is read here only when it cannot answer")
    p.add_argument("--daemon-socket", metavar="PATH", default=DEFAULT_SOCKET,
                   help=argparse.SUPPRESS)


def ask_daemon(args: argparse.Namespace, what: dict[str, Any]) -> dict[str, Any] | None:
    """safeusbd's inspect answer for the device, or None when it cannot give one (not
    running, not permitted, overloaded, an older protocol, a device it cannot find...):
    the caller then reads the host itself, so the daemon changes how fast the answer
    comes, never what it says."""
    if args.local or not os.path.exists(args.daemon_socket):
        return None
    from safeusb.safeusbd.client import ask  # noqa: PLC0415 (only when there is a daemon to ask)

    try:
        answer = ask("inspect", what, args.daemon_socket, timeout=DAEMON_TIMEOUT)
    except SafeUSBError as exc:
        logging.getLogger("safeusb").debug("safeusbd did not answer (%s): reading the "
                                           "host here", exc)
        return None
    return answer if isinstance(answer, dict) else None


def target_from_args(args: argparse.Namespace, roots: Roots) -> Target:
    from safeusb.host.selector import Selector, resolve  # noqa: PLC0415

    if (args.selector is None) == (args.xml is None):
        raise UsageError("give exactly one of SELECTOR or --xml FILE")
    if args.xml is not None:
        try:
            with open(args.xml, "rb") as f:
                data = f.read(16 * 1024 * 1024 + 1)
        except OSError as exc:
            raise XMLError(args.xml, exc.strerror or str(exc)) from None
        from safeusb.hostdev import usb_hostdevs  # noqa: PLC0415 (lxml only when XML is given)

        hostdevs = usb_hostdevs(data, args.xml)
        if len(hostdevs) != 1:
            raise XMLError(args.xml, f"holds {len(hostdevs)} USB host devices; give one")
        return resolve(Selector.from_hostdev(hostdevs[0], args.xml), roots)
    return resolve(Selector.from_string(args.selector), roots)


def cmd_inspect(args: argparse.Namespace, roots: Roots) -> int:
    if args.selector is not None and args.xml is None and roots.own_kernel:
        answer = ask_daemon(args, {"selector": args.selector})
        if answer is not None:
            from safeusb.textout import text_of_json  # noqa: PLC0415

            try:
                text = text_of_json(answer)
            except ValueError:
                pass  # not an answer to show: read the host here
            else:
                if args.json:
                    import json  # noqa: PLC0415

                    json.dump(answer, sys.stdout, indent=2)
                    sys.stdout.write("\n")
                else:
                    sys.stdout.write(text)
                return EXIT_FREE if answer["free"] else EXIT_IN_USE
    from safeusb.host.snapshot import read_snapshot  # noqa: PLC0415
    from safeusb.inspect.decide import inspect  # noqa: PLC0415
    from safeusb.inspect.report import as_json, as_text  # noqa: PLC0415

    target = target_from_args(args, roots)
    from safeusb.host.runner import Runner  # noqa: PLC0415 (to mount debugfs, if it is not)

    Runner.for_roots(roots).ensure_debugfs(roots)
    findings = inspect(read_snapshot(roots, target))
    if args.json:
        import json  # noqa: PLC0415

        json.dump(as_json(findings), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(as_text(findings))
    return EXIT_FREE if findings.free else EXIT_IN_USE


def _print_outcome(verb: str, head: str, outcome: Outcome, as_json: bool) -> int:
    if as_json:
        import json  # noqa: PLC0415

        json.dump(outcome.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_FREE if outcome.ok else EXIT_IN_USE
    from safeusb.handover.service import outcome_lines  # noqa: PLC0415

    out = sys.stdout if outcome.ok else sys.stderr
    out.write("\n".join(outcome_lines(verb, head, outcome)) + "\n")
    return EXIT_FREE if outcome.ok else EXIT_IN_USE


def _handover(args: argparse.Namespace, roots: Roots,
              progress: Callable[[str], None] | None = None,
              dry_run: bool = False) -> Handover:
    from safeusb.handover.service import Handover  # noqa: PLC0415 (the acting code only when acting)

    return Handover.from_paths(roots, args.policy, args.state_dir, progress, dry_run)


def cmd_prepare(args: argparse.Namespace, roots: Roots) -> int:
    from safeusb.host.runner import stderr_progress  # noqa: PLC0415

    target = target_from_args(args, roots)
    handover = _handover(args, roots, dry_run=args.dry_run, progress=stderr_progress)
    outcome = handover.prepare(target, args.domain, timeout=args.timeout)
    return _print_outcome("prepare", target.describe(), outcome, args.json)


def cmd_release(args: argparse.Namespace, roots: Roots) -> int:
    target = target_from_args(args, roots)
    handover = _handover(args, roots)
    policy = handover.policy_for_release(
        lambda text: print(f"safeusb: {text}", file=sys.stderr))
    outcome = handover.release_target(target, args.domain, policy)
    return _print_outcome("release", target.describe(), outcome, args.json)


def cmd_install_hook(args: argparse.Namespace, roots: Roots) -> int:
    from safeusb import install  # noqa: PLC0415

    if args.command == "install-hook":
        print(install.install(args.root, args.python, sites=args.site)
              .describe("installed"))
    else:
        print(install.uninstall(args.root).describe("removed"))
    return EXIT_FREE


def cmd_confinement(args: argparse.Namespace, roots: Roots) -> int:
    from safeusb import confinement  # noqa: PLC0415

    if args.command == "uninstall-confinement":
        lines = confinement.uninstall(args.root)
    elif args.print_only:
        blocks = confinement.render(confinement.Paths.of_this_installation())
        lines = [f"# /etc/apparmor.d/{rel}\n{body}" for rel, body in blocks.items()]
    else:
        lines = confinement.install(args.root)
    print("\n".join(lines))
    return EXIT_FREE


def cmd_udev_rules(args: argparse.Namespace, roots: Roots) -> int:
    from safeusb import udevrules  # noqa: PLC0415
    from safeusb.handover.policy import Policy  # noqa: PLC0415

    policy = Policy.from_file(args.policy)
    if args.print_only:
        sys.stdout.write(udevrules.render(policy))
    else:
        print(udevrules.install(policy, args.root, reload=args.root == "/").describe())
    return EXIT_FREE


def cmd_attach(args: argparse.Namespace, roots: Roots) -> int:
    from safeusb import attach  # noqa: PLC0415

    try:
        with open(args.file, "rb") as f:
            xml = f.read(16 * 1024 * 1024 + 1)
    except OSError as exc:
        raise XMLError(args.file, exc.strerror or str(exc)) from None
    flags = attach.Flags(args.live, args.config, args.current, args.persistent)
    handover = _handover(args, roots)
    if args.command == "attach-device":
        lines = attach.attach(handover, args.connect, args.domain, xml, args.file, flags,
                              handover.policy())
    else:
        policy = handover.policy_for_release(
            lambda text: print(f"safeusb: {text}", file=sys.stderr))
        lines = attach.detach(handover, args.connect, args.domain, xml, args.file, flags,
                              policy)
    print("\n".join(lines))
    return EXIT_FREE


def cmd_status(args: argparse.Namespace, roots: Roots) -> int:
    from safeusb.status import collect  # noqa: PLC0415

    def ask(bus: int, addr: int) -> dict[str, Any] | None:
        return ask_daemon(args, {"bus": bus, "addr": addr})

    guard_state = None
    if roots.own_kernel:  # the guard is this host's kernel's, not a recording's
        from safeusb.host.guard import report  # noqa: PLC0415

        guard_state = report(DEFAULT_STATE_DIR)
    status = collect(roots, args.connect, guard_state, ask=ask if roots.own_kernel else None,
                     policy_path=args.policy if roots.own_kernel else None,
                     state_dir=args.state_dir)
    if args.json:
        import json  # noqa: PLC0415

        json.dump(status.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(status.as_text())
    return EXIT_FREE


def cmd_guard(args: argparse.Namespace, roots: Roots) -> int:
    from safeusb.host import guard  # noqa: PLC0415

    if args.action == "status":
        rep = guard.report(args.state_dir)
        if args.json:
            import json  # noqa: PLC0415

            json.dump(rep, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(guard.as_text(rep))
        if rep["enabled"]:
            return guard.STATUS_ON
        return guard.STATUS_OFF if rep["available"] else guard.STATUS_UNAVAILABLE
    if args.action == "disable":
        print("guard: disabled" if guard.disable() else "guard: was not enabled")
        return EXIT_FREE
    avail = guard.availability()
    if not avail.available and not guard.enabled():
        print("safeusb: guard not available on this kernel: " + "; ".join(avail.reasons)
              + (f"; to enable it: {avail.hint}" if avail.hint else ""), file=sys.stderr)
        return guard.STATUS_UNAVAILABLE
    from safeusb.host.journal import StateDir  # noqa: PLC0415
    from safeusb.safeusbd.events import handed_over  # noqa: PLC0415

    state = StateDir(args.state_dir)
    keys, _problems = state.keys()
    ports = tuple(k for k in keys if (rec := state.load(k)) is not None and handed_over(rec))
    loaded = guard.enable(handed_over_ports=ports)
    if loaded is None:
        print("guard: already enabled")
    else:
        print(f"guard: enabled: {', '.join(guard.GUARDED_DRIVERS)} cannot be detached "
              f"unless safeusb hands the device over (load {loaded.load_seconds:.3f} s, "
              f"attach {loaded.attach_seconds:.3f} s, object {loaded.object_bytes} bytes)")
    return EXIT_FREE


def cmd_demo(args: argparse.Namespace, roots: Roots) -> int:
    from safeusb import demo  # noqa: PLC0415

    return demo.main(args.keep)


COMMANDS = {"demo": cmd_demo, "status": cmd_status, "attach-device": cmd_attach,
            "detach-device": cmd_attach, "inspect": cmd_inspect, "prepare": cmd_prepare,
            "release": cmd_release, "guard": cmd_guard,
            "install-hook": cmd_install_hook, "uninstall-hook": cmd_install_hook,
            "install-confinement": cmd_confinement, "uninstall-confinement": cmd_confinement,
            "install-udev-rules": cmd_udev_rules}


def _command_in(argv: list[str]) -> str | None:
    """The command the arguments name, when the parser need build no other: not for
    top-level help or version, nor for a name that is no command (its error lists them)."""
    for arg in argv:
        if arg in ("-h", "--help", "--version"):
            return None
        if not arg.startswith("-"):
            return arg if arg in COMMANDS or arg in ("protect", "unprotect") else None
    return None


def main(argv: Sequence[str] | None = None, roots: Roots | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser(_command_in(argv)).parse_args(argv)
        acting = args.command in ("prepare", "release", "protect", "unprotect",
                                  "attach-device", "detach-device") or (
            args.command == "guard" and args.action != "status")
        setup_logging(logging.INFO if (args.verbose or acting) else logging.WARNING, acting)
        if args.command in ("protect", "unprotect"):
            from safeusb import protect  # noqa: PLC0415

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
