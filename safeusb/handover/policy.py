"""Policy: what safeusb may do with each kind of use of a device, per device and domain.

A TOML file (default /etc/safeusb/policy.toml; see examples/*.toml):

    [defaults]
    mount = "refuse"      # mounted filesystems, in any mount namespace
    swap = "refuse"       # active swap on the device
    holder = "refuse"     # dm-crypt, LVM, md, loop devices built on it
    open = "refuse"       # processes holding its nodes or files open
    network = "refuse"    # its network interfaces up, addressed, routed or enslaved
    kill = false          # with open = "force": end those processes first (TERM, then KILL)
    restore = true        # release: remount and reactivate what prepare took down
    flush_timeout = 120   # seconds

    [[rules]]             # first match wins; unset keys come from [defaults]
    vendor_product = "46f4:0001"   # or a list; also serial, usb_class, port, domain
    mount = "unmount"
    attach_to = "win10"   # safeusbd hands matching devices to this domain when plugged in

    [service]             # safeusbd itself
    protect_new_domains = false   # true: safeusbd protects each domain as it is defined

Actions: "refuse"; "unmount" (flush, unmount in every namespace, take down holders and
swap); "force" (the same; processes holding device nodes are reported and left to get I/O
errors, or ended first with kill = true). Dirty data alone is always flushed. For network:
"refuse" or "down" (record the interface's configuration, take it down and unbind its
driver; release puts back what was configured by hand).
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import field, replace
from typing import Any, Literal

from safeusb import trust
from safeusb.errors import SafeUSBError
from safeusb.host import defaults
from safeusb.host.model import UsbDevice
from safeusb.values import frozen

DEFAULT_PATH = defaults.POLICY
MAX_TIMEOUT = 86400

Action = Literal["refuse", "unmount", "force"]
ACTIONS: tuple[Action, ...] = ("refuse", "unmount", "force")
USE_KINDS = ("mount", "swap", "holder", "open")
_MATCH_KEYS = ("vendor_product", "serial", "usb_class", "port", "domain")
NetworkAction = Literal["refuse", "down"]
NETWORK_ACTIONS: tuple[NetworkAction, ...] = ("refuse", "down")
# The settings of [defaults], of a [[rules]] table and of a domain's <safeusb:policy>.
SETTING_KEYS = (*USE_KINDS, "network", "kill", "restore", "flush_timeout")
_DEVICE_KEYS = ("vendor_product", "serial", "usb_class", "port")
# A libvirt domain name as safeusb accepts it in attach_to: printable, no "/" (libvirt
# refuses it too), no quote or backslash (it goes into udev rules and file names).
_DOMAIN_NAME = re.compile(r"[A-Za-z0-9_.+:@-][A-Za-z0-9 _.+:@-]{0,199}")
# What a serial may hold in a rule that udev must match exactly: no glob characters
# (udev reads * ? [ ] | as patterns), quotes or backslashes, nothing unprintable.
_UDEV_SAFE = re.compile(r"[A-Za-z0-9 _.,:;+=@#%&()<>{}~^$'/-]{1,126}")


class PolicyError(SafeUSBError):
    """A policy file that cannot be used. For a domain with USB devices, this refuses."""

    exit_code = 1

    def __init__(self, path: str, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line else path
        super().__init__(f"policy {where}: {message}")
        self.path = path
        self.line = line


def check_timeout(value: object) -> float:
    """A timeout in seconds: a finite number above 0 and at most a day."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be a positive number of seconds, not {value!r}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise ValueError(f"must be a positive number of seconds, not {value!r}") from None
    if not math.isfinite(number) or not 0 < number <= MAX_TIMEOUT:
        raise ValueError(f"must be a positive number of seconds, at most {MAX_TIMEOUT}, "
                         f"not {value!r}")
    return number


@frozen
class Settings:
    mount: Action = "refuse"
    swap: Action = "refuse"
    holder: Action = "refuse"
    open: Action = "refuse"
    network: NetworkAction = "refuse"
    kill: bool = False
    restore: bool = True
    flush_timeout: float = 120.0

    def action(self, kind: str) -> Action:
        value: Action = getattr(self, kind)
        return value


@frozen
class Rule:
    name: str
    settings: Settings
    vendor_product: tuple[str, ...] = ()
    serial: tuple[str, ...] = ()
    usb_class: tuple[int, ...] = ()
    port: tuple[str, ...] = ()
    domain: tuple[str, ...] = ()
    attach_to: str | None = None  # safeusbd hands matching devices to this domain

    def matches_device(self, usb: UsbDevice) -> bool:
        """The device matches the rule's device matchers (the domain matcher aside)."""
        return replace(self, domain=()).matches(usb, None)

    def matches(self, usb: UsbDevice | None, domain: str | None) -> bool:
        if self.domain and domain not in self.domain:
            return False
        if usb is None:
            return not (self.vendor_product or self.serial or self.usb_class or self.port)
        if self.vendor_product and usb.vid_pid not in self.vendor_product:
            return False
        if self.serial and usb.serial not in self.serial:
            return False
        if self.port and usb.sysname not in self.port:
            return False
        if self.usb_class:
            classes = {usb.device_class} | {i.interface_class for i in usb.interfaces}
            if not classes & set(self.usb_class):
                return False
        return True


@frozen
class Policy:
    source: str = "built-in defaults"
    defaults: Settings = field(default_factory=Settings)
    rules: tuple[Rule, ...] = ()
    protect_new_domains: bool = False  # [service]: safeusbd protects new domains

    @property
    def attach_rules(self) -> tuple[Rule, ...]:
        """The rules that name a domain to hand their devices to (attach_to), in order."""
        return tuple(r for r in self.rules if r.attach_to is not None)

    def attach_rule_for(self, usb: UsbDevice) -> Rule | None:
        """The first rule with attach_to whose device matchers the device matches. Rules
        without attach_to do not stand in its way: they only say how to prepare."""
        for rule in self.attach_rules:
            if rule.matches_device(usb):
                return rule
        return None

    def settings_for(self, usb: UsbDevice | None, domain: str | None) -> tuple[Settings, str]:
        """The settings that apply, and which rule gave them."""
        for rule in self.rules:
            if rule.matches(usb, domain):
                return rule.settings, f"rule {rule.name!r} of {self.source}"
        if self.source == "built-in defaults":
            return self.defaults, self.source
        return self.defaults, f"defaults of {self.source}"

    @classmethod
    def from_file(cls, path: str) -> Policy:
        """The policy in a file that only root (or the user running) can change."""
        try:
            with open(path, "rb") as f:
                real = trust.check_path(path, trust.trusted_owners())
                if not os.path.samestat(os.fstat(f.fileno()), os.stat(real)):
                    raise trust.Untrusted(f"{path} changed while it was read")
                data = f.read(1024 * 1024 + 1)
        except FileNotFoundError:
            if path == DEFAULT_PATH:
                return cls()
            raise PolicyError(path, "no such file") from None
        except trust.Untrusted as exc:
            raise PolicyError(path, f"not obeyed: others can change it: {exc}") from None
        except OSError as exc:
            raise PolicyError(path, exc.strerror or str(exc)) from None
        if len(data) > 1024 * 1024:
            raise PolicyError(path, "larger than 1 MiB")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyError(path, f"not UTF-8 ({exc.reason})") from None
        return cls.from_text(text, path)

    @classmethod
    def from_text(cls, text: str, path: str = "<policy>") -> Policy:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            m = re.search(r"line (\d+)", str(exc))
            raise PolicyError(path, str(exc), int(m.group(1)) if m else None) from None
        except RecursionError:
            raise PolicyError(path, "nested too deeply") from None
        loader = _Loader(path, text)
        unknown = set(doc) - {"defaults", "rules", "service"}
        if unknown:
            key = sorted(unknown)[0]
            raise PolicyError(path, f"unknown key {key!r}", loader.line_of(key))
        defaults = loader.settings(doc.get("defaults", {}), Settings(), "[defaults]")
        rules_doc = doc.get("rules", [])
        if not isinstance(rules_doc, list):
            raise PolicyError(path, "'rules' must be an array of tables ([[rules]])",
                              loader.line_of("rules"))
        rules = tuple(loader.rule(r, i, defaults) for i, r in enumerate(rules_doc, 1))
        return cls(path, defaults, rules, **loader.service(doc.get("service", {})))


class _Loader:
    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = text.split("\n")

    def line_of(self, key: str) -> int | None:
        pattern = re.compile(rf"^\s*(\[\[?\s*)?{re.escape(key)}\b")
        for i, line in enumerate(self.lines, 1):
            if pattern.match(line):
                return i
        return None

    def fail(self, key: str, message: str) -> PolicyError:
        return PolicyError(self.path, message, self.line_of(key))

    def settings(self, table: Any, base: Settings, where: str,
                 allowed: tuple[str, ...] = SETTING_KEYS) -> Settings:
        if not isinstance(table, dict):
            raise PolicyError(self.path, f"{where} must be a table")
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key == "attach_to" and where == "[defaults]":
                raise self.fail(key, "[defaults]: 'attach_to' belongs in a [[rules]] table")
            if key not in allowed and key not in _MATCH_KEYS and key != "attach_to":
                raise self.fail(key, f"{where}: unknown key {key!r}")
            if key in USE_KINDS:
                if value not in ACTIONS:
                    raise self.fail(key, f"{where}: {key} must be one of "
                                         f"{', '.join(ACTIONS)}, not {value!r}")
                values[key] = value
            elif key == "network":
                if value not in NETWORK_ACTIONS:
                    raise self.fail(key, f"{where}: network must be one of "
                                         f"{', '.join(NETWORK_ACTIONS)}, not {value!r}")
                values[key] = value
            elif key in ("kill", "restore"):
                if not isinstance(value, bool):
                    raise self.fail(key, f"{where}: {key} must be true or false")
                values[key] = value
            elif key == "flush_timeout":
                try:
                    values[key] = check_timeout(value)
                except ValueError as exc:
                    raise self.fail(key, f"{where}: flush_timeout {exc}") from None
        if where == "[defaults]":
            stray = set(table) & set(_MATCH_KEYS)
            if stray:
                key = sorted(stray)[0]
                raise self.fail(key, f"[defaults]: {key!r} belongs in a [[rules]] table")
        return replace(base, **values)

    def service(self, table: Any) -> dict[str, bool]:
        if not isinstance(table, dict):
            raise PolicyError(self.path, "[service] must be a table", self.line_of("service"))
        out: dict[str, bool] = {}
        for key, value in table.items():
            if key != "protect_new_domains":
                raise self.fail(key, f"[service]: unknown key {key!r}")
            if not isinstance(value, bool):
                raise self.fail(key, f"[service]: {key} must be true or false")
            out[key] = value
        return out

    def rule(self, table: Any, index: int, defaults: Settings) -> Rule:
        where = f"[[rules]] #{index}"
        if not isinstance(table, dict):
            raise PolicyError(self.path, f"{where} must be a table")
        name = table.get("name", f"#{index}")
        if not isinstance(name, str):
            raise self.fail("name", f"{where}: name must be a string")
        settings_table = {k: v for k, v in table.items() if k != "name"}
        settings = self.settings(settings_table, defaults, where)

        def strings(key: str, pattern: str | None = None) -> tuple[str, ...]:
            value = table.get(key, [])
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
                raise self.fail(key, f"{where}: {key} must be a string or a list of strings")
            if pattern:
                form = "vvvv:pppp in hex" if key == "vendor_product" else "2-1 or 1-1.4"
                for v in items:
                    if not re.fullmatch(pattern, v):
                        raise self.fail(key, f"{where}: {key} {v!r} is not of the form {form}")
            return tuple(v.lower() if key == "vendor_product" else v for v in items)

        classes = table.get("usb_class", [])
        class_items = [classes] if isinstance(classes, int) else classes
        if not isinstance(class_items, list) or not all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255
            for c in class_items
        ):
            raise self.fail("usb_class", f"{where}: usb_class must be a number 0-255 or a list")
        rule = Rule(
            name=name,
            settings=settings,
            vendor_product=strings("vendor_product", r"[0-9a-fA-F]{4}:[0-9a-fA-F]{4}"),
            serial=strings("serial"),
            usb_class=tuple(class_items),
            port=strings("port", r"\d+-\d+(\.\d+)*"),
            domain=strings("domain"),
        )
        if "attach_to" in table:
            rule = replace(rule, attach_to=self.attach_to(table, rule, where))
        return rule

    def attach_to(self, table: dict[str, Any], rule: Rule, where: str) -> str:
        """attach_to: a domain name, on a rule that says which devices (never all), with
        matchers a udev rule can match exactly."""
        value = table["attach_to"]
        if not isinstance(value, str) or not _DOMAIN_NAME.fullmatch(value) \
                or value != value.strip():
            raise self.fail("attach_to", f"{where}: attach_to must be a libvirt domain name "
                                         f"(letters, digits, space, _.+:@-), not {value!r}")
        if not any(getattr(rule, k) for k in _DEVICE_KEYS):
            raise self.fail("attach_to", f"{where}: attach_to needs a device matcher "
                                         f"({', '.join(_DEVICE_KEYS)}): without one every "
                                         "device plugged in would go to the domain")
        if rule.domain:
            raise self.fail("domain", f"{where}: a rule with attach_to names its domain "
                                      "there; leave 'domain' out")
        for serial in rule.serial:
            if not _UDEV_SAFE.fullmatch(serial):
                raise self.fail("serial", f"{where}: serial {serial!r} cannot be matched "
                                          "exactly by udev (glob characters, quotes, "
                                          "backslashes or unprintable characters)")
        if not _UDEV_SAFE.fullmatch(rule.name) or "'" in rule.name:
            raise self.fail("name", f"{where}: a rule with attach_to needs a name of "
                                    "printable characters without quotes, backslashes or "
                                    f"glob characters, not {rule.name!r}")
        return value
