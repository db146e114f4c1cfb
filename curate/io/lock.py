"""One writer per dataset directory and stage: an advisory lock file with its owner's pid and host.

`DIR/_locks/{stage}.lock` is held with flock(2) for the whole run: exclusively by a normal run,
shared by the tasks of a Slurm array (each of which also holds `{stage}.{i}-of-{n}.lock` exclusively).
So a second run of the same stage on the same directory stops with exit 2 while the first is alive,
array tasks run side by side but never beside a normal run, and the kernel drops the lock of a
process that died (SIGKILL, node reboot): a stale lock file is simply taken over. The owner written
into the file is only for the message. Linux NFS clients map flock to POSIX byte-range locks, so the
lock also holds across the nodes of a cluster on NFSv4 (not on NFSv3 without lockd).

`manifest_lock` serialises the read-modify-write of manifest.json between the stages' drivers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from curate.errors import CurateError
from curate.io.layout import DatasetDir


class LockHeld(CurateError):
    """Another live run holds the lock of this dataset directory and stage. Exit code 2."""

    exit_code = 2


def owner_info() -> dict[str, object]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def _describe(path: Path) -> str:
    try:
        o = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        o = {}
    if o.get("pid"):
        return f"pid {o['pid']} on host {o.get('host', '?')}, started {o.get('started', '?')}"
    return "the tasks of a Slurm array (see the *-of-*.lock files beside it)"


def _try_flock(path: Path, mode: int) -> int | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _write_owner(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(owner_info()) + "\n").encode(), 0)


@contextlib.contextmanager
def stage_lock(ds: DatasetDir, stage: str, array_slice: tuple[int, int] | None = None) -> Iterator[bool]:
    """Hold the lock of `stage` on `ds` for the block; yields True when held exclusively.

    Raises LockHeld (exit 2) naming the holder when another live run holds it.
    """
    path = ds.lock(stage)
    held: list[int] = []
    try:
        fd = _try_flock(path, fcntl.LOCK_SH if array_slice else fcntl.LOCK_EX)
        if fd is None:
            raise LockHeld(f"{ds.root}: another `curate {stage}` run is writing this directory "
                           f"({_describe(path)}; lock {path}). Wait for it to finish, or stop it; "
                           f"a lock left by a process that died is taken over automatically.")
        held.append(fd)
        if array_slice is None:
            _write_owner(fd)
        else:
            i, n = array_slice
            spath = ds.lock(f"{stage}.{i}-of-{n}")
            sfd = _try_flock(spath, fcntl.LOCK_EX)
            if sfd is None:
                raise LockHeld(f"{ds.root}: array task {i} of {n} of `curate {stage}` is already running "
                               f"({_describe(spath)}; lock {spath}).")
            held.append(sfd)
            _write_owner(sfd)
        yield array_slice is None
    finally:
        for fd in reversed(held):
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


@contextlib.contextmanager
def manifest_lock(ds: DatasetDir) -> Iterator[None]:
    """Block until this process alone may read-modify-write manifest.json."""
    path = ds.lock("manifest")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def process_alive(pid: int, host: str | None) -> bool | None:
    """True/False for a process on this host; None when it ran elsewhere (cannot tell)."""
    if host and host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True
