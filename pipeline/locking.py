"""One writer per tile store: the build lock, and the build id that fences stale tasks.

A build holds, for its whole run, either
- `flock` on `<store>/.build.lock` (the default; the OS drops it when the process dies,
  even by kill -9), or
- with `--no-lock` (file systems without flock: some NFS and FUSE mounts), a lease file
  `<store>/.build.lease` created exclusively (O_CREAT | O_EXCL) and renewed by a
  heartbeat thread; a lease not renewed for `lease_seconds` is stale and may be taken over.

Either way the file names the holder (`WriterInfo`: host, pid, start time, build id) so
a second build is refused with a message naming the first. The build id also fences
tasks: a slide task commits only while the store's current writer has its build id, so
tasks left running on a cluster by a killed driver cannot commit under a restarted build.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipeline.schema.errors import TileStoreError

LOCK_FILE = ".build.lock"
LEASE_FILE = ".build.lease"
LOCK_FILES = (LOCK_FILE, LEASE_FILE)
DEFAULT_LEASE_SECONDS = 120.0


class StoreLockedError(TileStoreError):
    """Another build is writing the store; the message names it (host, pid, start time)."""


class LockUnsupportedError(TileStoreError):
    """The file system has no flock; the message says to choose `--no-lock`."""


@dataclass(frozen=True, kw_only=True)
class WriterInfo:
    """Who holds a store: host, pid, start time (UTC ISO), build id; expires: lease end
    (seconds since the epoch; 0 for a flock holder, whose lock the OS releases)."""

    host: str
    pid: int
    started: str
    build_id: str
    mode: str
    expires: float = 0.0

    @classmethod
    def new(cls, mode: str) -> "WriterInfo":
        return cls(host=socket.gethostname(), pid=os.getpid(), started=datetime.now(UTC).isoformat(timespec="seconds"),
                   build_id=uuid.uuid4().hex, mode=mode)

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"

    def to_text(self) -> str:
        return json.dumps(asdict(self))


def _parse(text: str) -> WriterInfo | None:
    try:
        return WriterInfo(**json.loads(text))
    except (ValueError, TypeError):
        return None


def read_writer(store_path: str | os.PathLike) -> WriterInfo | None:
    """The store's current writer as its lock or lease file names it, or None.

    A flock file keeps its text only while its build runs (cleared at the end); a lease
    counts while it has not expired.
    """
    root = Path(store_path)
    for name in (LEASE_FILE, LOCK_FILE):
        try:
            info = _parse((root / name).read_text())
        except OSError:
            continue
        if info is not None and (info.mode == "flock" or info.expires > time.time()):
            return info
    return None


def current_build_id(store_path: str | os.PathLike) -> str | None:
    info = read_writer(store_path)
    return info.build_id if info else None


@contextmanager
def build_lock(store_path: str | os.PathLike, *, use_flock: bool = True,
               lease_seconds: float = DEFAULT_LEASE_SECONDS) -> Iterator[WriterInfo]:
    """Hold the store (a folder that exists) for one build; yields this build's `WriterInfo`.

    Raises StoreLockedError naming the holder when another build has it, and
    LockUnsupportedError when flock is not available (then pass use_flock=False).
    """
    root = Path(store_path)
    if use_flock:
        with _flock(root) as info:
            yield info
    else:
        with _lease(root, lease_seconds) as info:
            yield info


def _locked_message(root: Path, holder: WriterInfo | None) -> str:
    who = holder.describe() if holder else "a process whose details could not be read"
    return (f"another `pm-tiles build` is writing {root} ({who}); wait for it to finish, "
            "or stop it, before building this store again")


@contextmanager
def _flock(root: Path) -> Iterator[WriterInfo]:
    import fcntl

    lease = _lease_holder(root)
    if lease is not None:
        raise StoreLockedError(_locked_message(root, lease))
    with open(root / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise StoreLockedError(_locked_message(root, _parse(handle.read()))) from None
        except OSError as error:
            if error.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK):
                raise LockUnsupportedError(
                    f"the file system of {root} does not support flock ({os.strerror(error.errno)}); "
                    "run `pm-tiles build --no-lock` to use an exclusive lease file instead "
                    "(safe as long as every writer of this store uses a pm-tiles that knows leases)"
                ) from None
            raise
        info = WriterInfo.new("flock")
        _rewrite(handle, info.to_text())
        try:
            yield info
        finally:
            _rewrite(handle, "")
            fcntl.flock(handle, fcntl.LOCK_UN)


def _rewrite(handle, text: str) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(text)
    handle.flush()
    os.fsync(handle.fileno())


def _lease_holder(root: Path) -> WriterInfo | None:
    try:
        info = _parse((root / LEASE_FILE).read_text())
    except OSError:
        return None
    return info if info is not None and info.expires > time.time() else None


@contextmanager
def _lease(root: Path, lease_seconds: float) -> Iterator[WriterInfo]:
    if lease_seconds <= 0:
        raise ValueError(f"lease seconds must be positive, got {lease_seconds}")
    path = root / LEASE_FILE
    flock_holder = _parse(_read_or_empty(root / LOCK_FILE))
    if flock_holder is not None:  # a flock build runs (its file is cleared when it ends)
        raise StoreLockedError(_locked_message(root, flock_holder))
    info = WriterInfo.new("lease")
    info = WriterInfo(**{**asdict(info), "expires": time.time() + lease_seconds})
    if not _create_exclusive(path, info.to_text()):
        holder = _parse(_read_or_empty(path))
        if holder is not None and holder.expires > time.time():
            raise StoreLockedError(_locked_message(root, holder))
        _take_over(path, holder)
        if not _create_exclusive(path, info.to_text()):
            raise StoreLockedError(_locked_message(root, _parse(_read_or_empty(path))))
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(path, info, lease_seconds, stop), daemon=True)
    renewer.start()
    try:
        yield info
    finally:
        stop.set()
        renewer.join()
        current = _parse(_read_or_empty(path))
        if current is not None and current.build_id == info.build_id:
            path.unlink(missing_ok=True)


def _read_or_empty(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _create_exclusive(path: Path, text: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return True


def _take_over(path: Path, stale: WriterInfo | None) -> None:
    """Move a stale lease aside; only one of several contenders' renames succeeds, and a
    lease that turns out not to be the stale one read is put back."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    moved = _parse(_read_or_empty(aside))
    if stale is not None and moved is not None and moved.build_id != stale.build_id:
        os.rename(aside, path)  # another contender's fresh lease: give it back
        return
    aside.unlink(missing_ok=True)


def _renew(path: Path, info: WriterInfo, lease_seconds: float, stop: threading.Event) -> None:
    while not stop.wait(lease_seconds / 3):
        renewed = WriterInfo(**{**asdict(info), "expires": time.time() + lease_seconds})
        aside = path.with_name(f"{path.name}.tmp-{info.build_id}")
        aside.write_text(renewed.to_text())
        os.replace(aside, path)
