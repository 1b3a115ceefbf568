"""The safeusb command line. Exit codes: 0 free/done, 1 in use or refused, 2 usage."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .errors import EXIT_FREE, EXIT_IN_USE, SafeUSBError, UsageError, XMLError, exit_code_for
from .inspect import inspect
from .model import Target
from .report import as_json, as_text
from .roots import Roots
from .run import Runner
from .selector import Selector, resolve
from .snapshot import read_snapshot


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


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

    # protect / unprotect (safeusb.protect)
    from . import protect  # noqa: PLC0415

    protect.register(sub)
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


def main(argv: Sequence[str] | None = None, roots: Roots | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="safeusb: %(message)s",
        )
        if args.command in ("protect", "unprotect"):
            from . import protect  # noqa: PLC0415

            return protect.run(args)
        return cmd_inspect(args, roots or Roots.host())
    except SafeUSBError as exc:
        print(f"safeusb: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        print("safeusb: interrupted", file=sys.stderr)
        return EXIT_IN_USE


if __name__ == "__main__":
    sys.exit(main())
