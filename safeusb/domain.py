"""libvirt domain XML: the USB host devices a domain uses and its safeusb policy metadata.

Policy overrides live in the domain's <metadata>, in safeusb's own namespace:

    <metadata>
      <safeusb:policy xmlns:safeusb="https://safeusb.invalid/xmlns/1"
                      mount="unmount" swap="refuse" holder="unmount" open="refuse"
                      network="refuse" kill="false" restore="true" flush_timeout="60"/>
    </metadata>

Each attribute overrides the setting the policy file gives this domain's devices.
"""

from __future__ import annotations

from dataclasses import replace

from safeusb.errors import XMLError
from safeusb.handover.policy import (
    SETTING_KEYS,
    Policy,
    PolicyError,
    Settings,
    _Loader,
    check_timeout,
)
from safeusb.hostdev import MAX_XML_BYTES, UsbHostdev, _is_usb_hostdev, parse_xml
from safeusb.values import frozen

NS = "https://safeusb.invalid/xmlns/1"


@frozen
class DomainInfo:
    name: str
    hostdevs: tuple[UsbHostdev, ...]
    policy: dict[str, str]  # attributes of <safeusb:policy>, unparsed

    @classmethod
    def from_xml(cls, data: bytes, source: str = "domain XML",
                 limit: int = MAX_XML_BYTES) -> DomainInfo:
        root = parse_xml(data, source, limit)
        if root.tag != "domain":
            raise XMLError(source, f"root element is <{root.tag}>, not <domain>")
        name = root.findtext("name") or ""
        devices = root.find("devices")
        found = [] if devices is None else [
            UsbHostdev.from_element(el, source) for el in devices.iter("hostdev")
            if _is_usb_hostdev(el)
        ]
        policy: dict[str, str] = {}
        meta = root.find("metadata")
        if meta is not None:
            el = meta.find(f"{{{NS}}}policy")
            if el is not None:
                policy = {str(k): str(v) for k, v in el.attrib.items()}
        return cls(name, tuple(found), policy)

    def settings(self, base: Settings) -> Settings:
        """The base settings with this domain's metadata overrides applied."""
        if not self.policy:
            return base
        values: dict[str, object] = {}
        known = SETTING_KEYS
        for key, text in self.policy.items():
            if key not in known:
                raise PolicyError(f"<safeusb:policy> of domain {self.name}",
                                  f"unknown attribute {key!r} (known: {', '.join(known)})")
            if key in ("kill", "restore"):
                if text not in ("true", "false"):
                    raise PolicyError(f"<safeusb:policy> of domain {self.name}",
                                      f"{key} must be true or false, not {text!r}")
                values[key] = text == "true"
            elif key == "flush_timeout":
                try:
                    values[key] = check_timeout(text.strip())
                except ValueError as exc:
                    raise PolicyError(f"<safeusb:policy> of domain {self.name}",
                                      f"flush_timeout {exc}") from None
            else:
                values[key] = text
        loader = _Loader(f"<safeusb:policy> of domain {self.name}", "")
        return loader.settings(values, base, "<safeusb:policy>", allowed=known)


def policy_for_domain(policy: Policy, info: DomainInfo) -> Policy:
    """A policy whose every outcome carries the domain's metadata overrides."""
    if not info.policy:
        return policy
    rules = tuple(replace(r, settings=info.settings(r.settings)) for r in policy.rules)
    return replace(policy, defaults=info.settings(policy.defaults), rules=rules,
                   source=f"{policy.source} with the metadata of domain {info.name}")
