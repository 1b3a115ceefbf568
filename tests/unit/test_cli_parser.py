"""The command line built for one command parses that command as the whole one does:
the same values, the same errors, the same help."""

from __future__ import annotations

import contextlib
import io

import pytest

from safeusb import cli
from safeusb.errors import UsageError

ARGVS = [
    ["inspect", "2-1"], ["inspect", "--json", "--local", "/dev/sda"], ["-v", "inspect", "2-1"],
    ["inspect", "--xml", "h.xml"], ["inspect", "2-1", "--bogus"], ["inspect"],
    ["prepare", "2-1", "--dry-run", "--timeout", "30", "--domain", "g1"],
    ["prepare", "2-1", "--timeout", "nan"], ["release", "2-1", "--policy", "p.toml"],
    ["status", "--json", "-c", "test:///default"], ["status", "--local"], ["demo", "--keep"],
    ["attach-device", "g1", "f.xml", "--live"], ["detach-device", "g1"],
    ["install-hook", "--root", "/tmp/x", "--python", "/usr/bin/python3"],
    ["uninstall-hook"], ["install-confinement", "--print"],
    ["uninstall-confinement", "--root", "/tmp/x"], ["protect", "g1"], ["unprotect", "g1", "-c", "qemu:///system"],
]


def _parse(parser: object, argv: list[str]) -> object:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            return vars(parser.parse_args(argv))  # type: ignore[attr-defined]
    except UsageError as exc:
        return ("usage error", str(exc))
    except SystemExit as exc:
        return ("exit", exc.code, out.getvalue())


@pytest.mark.parametrize("argv", ARGVS, ids=" ".join)
def test_one_command_parses_as_the_whole(argv: list[str]) -> None:
    only = cli._command_in(argv)
    assert only == next(a for a in argv if not a.startswith("-"))
    assert _parse(cli.build_parser(only), argv) == _parse(cli.build_parser(), argv)


@pytest.mark.parametrize("command", sorted({a[0] for a in ARGVS if a[0] != "-v"}))
def test_one_command_helps_as_the_whole(command: str) -> None:
    def helped(parser: object) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])  # type: ignore[attr-defined]
        return out.getvalue()

    assert helped(cli.build_parser(command)) == helped(cli.build_parser())


@pytest.mark.parametrize("argv", [[], ["--help"], ["-v", "--version"], ["bogus", "2-1"],
                                  ["-v"], ["-h", "inspect"]])
def test_everything_else_builds_the_whole(argv: list[str]) -> None:
    assert cli._command_in(argv) is None


def test_an_option_before_the_command_fails_alike() -> None:
    argv = ["--json", "inspect", "2-1"]
    assert cli._command_in(argv) == "inspect"
    assert _parse(cli.build_parser("inspect"), argv) == _parse(cli.build_parser(), argv)
    assert _parse(cli.build_parser(), argv)[0] == "usage error"  # type: ignore[index]
