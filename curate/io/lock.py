"""One writer per dataset directory and stage: an advisory lock file with its owner's pid and host.

`DIR/_locks/{stage}.lock` is held with flock(2) for the whole run: exclusively by a normal run,
shared by the tasks of a Slurm array (each of which also holds `{stage}.{i}-of-{n}.lock` exclusively).
So a second run of the same stage on the same directory stops with exit 2 while the first is alive,
array tasks run side by side but never beside a normal run, and the kernel drops the lock of a
process that died (SIGKILL, node reboot): a stale lock file is simply taken over. The owner written
into the file is only for the message. Linux NFS clients map flock to POSIX byte-range locks, so the
lock also holds across the nodes of a cluster on NFSv4 (not on NFSv3 without lockd).

`manifest_lock` serialises the read-modify-write of manifest.json between the stages' drivers.

A filesystem without flock (Lustre mounted without `flock`, some FUSE and old NFS mounts: ENOSYS,
EOPNOTSUPP, ENOLCK) and a Lustre mount with `localflock` (flock that holds on one node only, which would
let two nodes write one directory) are refused with a message naming the mount and the way out;
CURATE_LOCK=none runs without the lock, leaving one run per directory and stage to the user.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
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


class LockUnsupported(CurateError):
    """The dataset directory's filesystem cannot hold the lock across nodes. Exit code 2."""

    exit_code = 2


# flock(2) errors that mean "this filesystem does not do flock", not "someone holds it"
_UNSUPPORTED = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL, getattr(errno, "ENOTSUP", -1)}
LOCK_ENV = "CURATE_LOCK"  # "none": run without the lock


def locking_disabled() -> bool:
    return os.environ.get(LOCK_ENV, "").strip().lower() == "none"


def _unsupported(path: Path, why: str) -> LockUnsupported:
    return LockUnsupported(f"{path}: cannot lock this dataset directory: {why}. Two runs of one stage on one "
                           f"directory would overwrite each other's shards, so curate stops here. Mount the "
                           f"filesystem with cluster-wide flock (Lustre: -o flock; NFS: v4, or v3 with lockd), "
                           f"use a directory on such a mount, or set {LOCK_ENV}=none to run without the lock "
                           f"(then make sure yourself that one run at a time writes each stage of it).")


def mount_of(path: Path, mounts_text: str | None = None) -> tuple[str, str, set[str]]:
    """(mount point, filesystem type, options) of the mount holding `path`, from /proc/mounts."""
    if mounts_text is None:
        try:
            mounts_text = Path("/proc/mounts").read_text()
        except OSError:
            return ("", "", set())
    best = ("", "", set[str]())
    target = str(path.resolve())
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, parts[2], set(parts[3].split(",")))
    return best


def check_cluster_lock(path: Path, mounts_text: str | None = None) -> None:
    """Refuse a mount whose flock holds on this node only (Lustre `localflock`)."""
    point, fstype, opts = mount_of(path, mounts_text)
    if fstype == "lustre" and "localflock" in opts:
        raise _unsupported(path, f"{point} is a Lustre mount with localflock, whose locks hold on this node "
                                 f"only")


def _try_flock(path: Path, mode: int) -> int | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as e:
        os.close(fd)
        if e.errno in _UNSUPPORTED:
            point, fstype, _ = mount_of(path.parent)
            where = f" ({fstype} mounted at {point})" if point else ""
            raise _unsupported(path, f"the filesystem does not support flock{where}: "
                                     f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}") from None
        raise
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
    if locking_disabled():
        import logging

        logging.getLogger(__name__).warning("%s=none: running `curate %s` on %s without its lock", LOCK_ENV,
                                            stage, ds.root)
        yield array_slice is None
        return
    check_cluster_lock(ds.root)
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
    if locking_disabled():
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                raise _unsupported(path, f"the filesystem does not support flock: "
                                         f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}") from None
            raise
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
