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


def tmp_path_for(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}")


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
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


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


def remove_shard_tmp(folders: list[Path], task: str) -> None:
    """Remove the temporary files an earlier, killed attempt at `task` left in `folders` (and one level below).

    Unlike clean_tmp this needs no age limit: the engine runs one attempt per task at a time. Only the
    stage's own folders are listed (never the whole dataset tree), so the cost per task does not grow with
    the other stages' files.
    """
    pattern = f"{TMP_PREFIX}*-{task}.*"
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in [*folder.glob(pattern), *folder.glob(f"*/{pattern}")]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
