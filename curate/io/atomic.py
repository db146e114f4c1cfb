"""Atomic writes: every file is written to a temporary name in the same folder and renamed into place."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"
# While a shard task runs (curate.stages.base.execute_task), its temporary files go to one folder of its
# own, DIR/_work/_tmp/{stage}/{task}/, and are renamed from there into place: so the files a killed attempt
# left are found (and removed) by one look at that folder, never by listing the stage's output folders,
# whose size grows with the number of shards. Outside a task (the driver) they sit beside their target.
_TASK_TMP: Path | None = None


def set_task_tmp(folder: Path | None) -> None:
    """Where this process's task writes its temporary files (None: beside each target)."""
    global _TASK_TMP
    _TASK_TMP = folder


def tmp_path_for(path: Path) -> Path:
    name = f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}"
    if _TASK_TMP is not None:
        _TASK_TMP.mkdir(parents=True, exist_ok=True)
        return _TASK_TMP / name
    return path.with_name(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success fsync it and rename it onto `path`; on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        _replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _replace(tmp: Path, path: Path) -> None:
    """os.replace; a task's temp folder on another filesystem than the target (a symlinked folder) is copied
    beside the target first, so the final step is still one rename."""
    import errno
    import shutil

    try:
        os.replace(tmp, path)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        beside = path.with_name(tmp.name)
        try:
            shutil.copyfile(tmp, beside)
            with open(beside, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(beside, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                beside.unlink()
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    with open(path, "rb") as fh:
        return json.load(fh)


def clean_tmp(folder: str | os.PathLike, older_than_s: float = 1800.0) -> int:
    """Remove temporary files left by a killed writer; returns how many were removed.

    Only files untouched for `older_than_s` go: another process (a concurrent Slurm array task)
    may be writing its own temporary file in the same folder right now.
    """
    import time

    n = 0
    folder = Path(folder)
    if not folder.exists():
        return 0
    cutoff = time.time() - older_than_s
    for p in folder.rglob(f"{TMP_PREFIX}*"):
        with contextlib.suppress(FileNotFoundError):
            if p.stat().st_mtime <= cutoff:
                p.unlink()
                n += 1
    return n


def remove_shard_tmp(folder: Path) -> None:
    """Remove the temporary files an earlier, killed attempt at a task left in its own temp folder.

    No age limit is needed: the engine runs one attempt per task at a time. One stat when there is
    nothing to remove, so the cost per task does not grow with the number of shards.
    """
    import shutil

    if folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
