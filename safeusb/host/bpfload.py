"""libbpf (libbpf1) through ctypes: the loader shared by the kernel guard (guard.py) and
the in-kernel scan (bpfscan.py). Loaded on first use only."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

from safeusb.errors import SafeUSBError


class BPFError(SafeUSBError):
    pass


# int (*)(void *ctx, void *data, size_t size): a ring buffer's sample callback
SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


class Libbpf:
    def __init__(self) -> None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise BPFError(f"libbpf is not installed ({exc}; Debian package libbpf1)") \
                from None
        p, i, s, u = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint64
        sig: dict[str, tuple[Any, list[Any]]] = {
            "bpf_object__open_file": (p, [s, p]),
            "bpf_object__load": (i, [p]),
            "bpf_object__close": (None, [p]),
            "bpf_object__find_program_by_name": (p, [p, s]),
            "bpf_object__find_map_by_name": (p, [p, s]),
            "bpf_program__attach": (p, [p]),
            "bpf_program__attach_iter": (p, [p, p]),
            "bpf_program__set_autoload": (i, [p, ctypes.c_bool]),
            "bpf_link__pin": (i, [p, s]),
            "bpf_link__fd": (i, [p]),
            "bpf_link__destroy": (i, [p]),
            "bpf_iter_create": (i, [i]),
            "bpf_map__pin": (i, [p, s]),
            "bpf_map__fd": (i, [p]),
            "bpf_obj_get": (i, [s]),
            "bpf_map_update_elem": (i, [i, p, p, u]),
            "bpf_map_lookup_elem": (i, [i, p, p]),
            "bpf_map_delete_elem": (i, [i, p]),
            "bpf_map_get_next_key": (i, [i, p, p]),
            "ring_buffer__new": (p, [i, SAMPLE_FN, p, p]),
            "ring_buffer__poll": (i, [p, i]),
            "ring_buffer__free": (None, [p]),
            "libbpf_probe_bpf_prog_type": (i, [i, p]),
            "libbpf_set_print": (p, [p]),
        }
        for fn, (res, args) in sig.items():
            f = getattr(lib, fn)
            f.restype, f.argtypes = res, args
        self.lib = lib

    @staticmethod
    def err(what: str, rc: int | None = None) -> BPFError:
        code = -rc if rc is not None and rc < 0 else ctypes.get_errno()
        return BPFError(f"{what}: {os.strerror(code) if code else 'failed'}")


_LIB: Libbpf | None = None


def libbpf() -> Libbpf:
    global _LIB  # noqa: PLW0603
    if _LIB is None:
        _LIB = Libbpf()
    return _LIB


def mount(source: str, target: str, fstype: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def bpffs() -> None:
    """Mount bpffs at /sys/fs/bpf if it is not there."""
    if not os.path.ismount("/sys/fs/bpf"):
        try:
            mount("bpf", "/sys/fs/bpf", "bpf")
        except OSError as exc:
            raise BPFError(f"cannot mount bpffs at /sys/fs/bpf: {exc.strerror}") from None
