"""What prepare took from the host, kept under /run/safeusb so release can put it back.

Files are root-owned, mode 0600, written atomically; a file that is not (wrong owner or
mode, a symlink, garbled) is not trusted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import stat
import time
from collections.abc import Callable, Iterator
from typing import Any

from safeusb.errors import SafeUSBError
from safeusb.host import defaults
from safeusb.values import frozen

DEFAULT_DIR = defaults.STATE_DIR
MAX_RECORD_BYTES = 1024 * 1024


class StateError(SafeUSBError):
    exit_code = 1


class DeviceBusy(SafeUSBError):
    """Another safeusb run, or another domain, has the device."""

    exit_code = 1


@frozen
class Record:
    key: str  # "2-1" (USB port path) or a block device name
    domain: str | None
    created: float
    steps: tuple[dict[str, Any], ...]  # Step.as_json() of every step carried out
    restore: bool | None = None  # the policy's restore when prepare took the device
    # prepared by safeusbd because the kernel guard refused a program the device: its
    # guest takes it only once an interface is claimed (safeusb.safeusbd.events)
    after_refusal: bool = False

    def as_json(self) -> dict[str, Any]:
        doc = {"version": 1, "key": self.key, "domain": self.domain,
               "created": self.created, "steps": list(self.steps), "restore": self.restore}
        if self.after_refusal:
            doc["after_refusal"] = True
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> Record:
        """A record from its JSON document; ValueError names what is wrong with it."""
        if not isinstance(doc, dict):
            raise ValueError(f"a JSON {type(doc).__name__}, not an object")
        key, domain, created = doc.get("key"), doc.get("domain"), doc.get("created")
        steps, restore = doc.get("steps"), doc.get("restore")
        after_refusal = doc.get("after_refusal", False)
        if not isinstance(key, str) or not key:
            raise ValueError("'key' is not a non-empty string")
        if domain is not None and not isinstance(domain, str):
            raise ValueError("'domain' is neither a string nor null")
        if isinstance(created, bool) or not isinstance(created, int | float) \
                or not math.isfinite(created):
            raise ValueError("'created' is not a number")
        if not isinstance(steps, list) or not all(
                isinstance(s, dict) and isinstance(s.get("kind"), str) for s in steps):
            raise ValueError("'steps' is not a list of steps")
        if restore is not None and not isinstance(restore, bool):
            raise ValueError("'restore' is neither true, false nor null")
        if not isinstance(after_refusal, bool):
            raise ValueError("'after_refusal' is neither true nor false")
        return cls(key, domain, float(created), tuple(steps), restore, after_refusal)


class StateDir:
    def __init__(self, path: str = DEFAULT_DIR) -> None:
        self.path = path

    def _ensure(self) -> None:
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            st = os.lstat(self.path)
        except OSError as exc:
            raise StateError(f"{self.path}: {exc.strerror or exc}: state is not trusted") \
                from None
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise StateError(f"{self.path} is not a private directory owned by this user "
                             "(owner, mode or a symlink): state is not trusted")

    def _file(self, key: str, suffix: str) -> str:
        safe = "".join(c if c.isalnum() or c in "-._:" else "_" for c in key)
        return os.path.join(self.path, f"{safe}.{suffix}")

    @contextlib.contextmanager
    def lock(self, key: str, wait: float = 0.0) -> Iterator[None]:
        """One safeusb at a time per device. With ``wait``, wait up to that many seconds
        for another holder to finish (release waits for safeusbd giving the device back
        on its own, for instance) before DeviceBusy."""
        self._ensure()
        path = self._file(key, "lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC |
                         os.O_NONBLOCK, 0o600)
        except OSError as exc:
            what = "is a symlink" if exc.errno == errno.ELOOP else \
                f"cannot be opened ({exc.strerror or exc})"
            raise StateError(f"lock {path} {what}: state is not trusted") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise StateError(f"lock {path} is not a regular file of this user: "
                                 "state is not trusted")
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise DeviceBusy(f"{key}: another safeusb is preparing or releasing "
                                         "it right now") from None
                    time.sleep(0.1)
            yield
        finally:
            os.close(fd)

    def load(self, key: str) -> Record | None:
        path = self._file(key, "json")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StateError(f"{path} is a symlink: state is not trusted") from None
            raise StateError(f"{path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_uid != os.geteuid() or st.st_mode & 0o077 or not stat.S_ISREG(st.st_mode):
                raise StateError(f"{path} has the wrong owner or mode: state is not trusted")
            raw = f.read(MAX_RECORD_BYTES + 1)
        if len(raw) > MAX_RECORD_BYTES:
            raise StateError(f"{path} is larger than {MAX_RECORD_BYTES} bytes: "
                             "state is not trusted")
        try:
            record = Record.from_json(json.loads(raw))
        except (ValueError, RecursionError) as exc:
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise StateError(f"{path} is garbled ({why}): state is not trusted") from None
        if self._file(record.key, "json") != path:
            raise StateError(f"{path} holds the record of {record.key!r}, not of {key!r}: "
                             "state is not trusted")
        return record

    def save(self, record: Record) -> None:
        self._ensure()
        path = self._file(record.key, "json")
        tmp = f"{path}.{os.getpid()}.tmp"
        data = json.dumps(record.as_json(), indent=1).encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                         os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StateError(f"cannot record state in {path}: {exc.strerror or exc}") from None

    def keys_for_domain(self, domain: str) -> tuple[list[str], list[str]]:
        """Devices whose records say they were taken for the domain, and a line for each
        record that could not be read (it may be this domain's: never skipped in silence)."""
        return self._keys(lambda record: record.domain == domain)

    def keys(self) -> tuple[list[str], list[str]]:
        """Every device with a record, and a line for each record that cannot be read."""
        return self._keys(lambda record: True)

    def _keys(self, wanted: Callable[[Record], bool]) -> tuple[list[str], list[str]]:
        try:
            names = sorted(os.listdir(self.path))
        except FileNotFoundError:
            return [], []
        except OSError as exc:
            return [], [f"cannot list {self.path}: {exc.strerror or exc}"]
        keys: list[str] = []
        problems: list[str] = []
        for name in names:
            if name.endswith(".json"):
                try:
                    record = self.load(name[: -len(".json")])
                except StateError as exc:
                    problems.append(str(exc))
                    continue
                if record is not None and wanted(record):
                    keys.append(record.key)
        return keys, problems

    def remove(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._file(key, "json"))


def new_record(key: str, domain: str | None, steps: list[dict[str, Any]],
               restore: bool | None = None, after_refusal: bool = False) -> Record:
    return Record(key, domain, time.time(), tuple(steps), restore, after_refusal)
