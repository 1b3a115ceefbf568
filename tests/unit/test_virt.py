"""safeusb.host.virt, the one module that calls libvirt: its values are libvirt's, its
errors carry libvirt's message and code, a missing libvirt-python is told apart."""

from __future__ import annotations

import sys

import pytest

from safeusb.errors import LibvirtError
from safeusb.host import virt

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is a dependency of safeusb")

URI = "test:///default"


def test_the_values_are_libvirts() -> None:
    assert virt.AFFECT_LIVE == libvirt.VIR_DOMAIN_AFFECT_LIVE
    assert virt.AFFECT_CONFIG == libvirt.VIR_DOMAIN_AFFECT_CONFIG
    assert virt.ERR_NO_SUPPORT == libvirt.VIR_ERR_NO_SUPPORT
    assert virt.ERR_NO_DOMAIN == libvirt.VIR_ERR_NO_DOMAIN
    assert virt.ERR_GONE == (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN,
                             libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC)


def test_errors_carry_libvirts_message_and_code() -> None:
    with virt.Connection.open(URI, read_only=True) as conn:
        assert conn.uri() == URI
        assert [d.name for d in conn.domains()] == sorted(d.name for d in conn.domains())
        test = conn.domain("test")
        assert test.active() and b"<name>test</name>" in test.xml()
        with pytest.raises(virt.VirtError) as caught:
            conn.domain("no-such-domain")
    assert isinstance(caught.value, LibvirtError)
    assert caught.value.code == virt.ERR_NO_DOMAIN
    assert str(caught.value) == "Domain not found"
    assert virt.domain_active(URI, "test") is True
    assert virt.domain_active(URI, "no-such-domain") is False
    assert virt.domain_active("test:///nonexistent/file.xml", "test") is None


def test_a_read_only_connection_cannot_define() -> None:
    with virt.Connection.open(URI, read_only=True) as conn, \
            pytest.raises(virt.VirtError, match=r"read only|read-only"):
        conn.define("<domain type='test'><name>x</name><memory>1024</memory>"
                    "<os><type>hvm</type></os></domain>")


def test_without_libvirt_python_it_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "libvirt", None)  # import libvirt: ImportError
    with pytest.raises(virt.VirtMissing, match="libvirt-python is not installed"):
        virt.Connection.open(URI)
    assert virt.load() is False
    assert virt.domain_active(URI, "test") is None
