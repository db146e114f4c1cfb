"""manifest.json: each stage's resolved config, fingerprint, package versions, inputs and counts.

Only the driver writes the manifest (never a shard task), so concurrent tasks cannot race on it.
"""

from __future__ import annotations

import datetime as dt
import platform
import sys
from importlib import metadata
from typing import Any

from curate import __version__
from curate.errors import ConfigMismatchError
from curate.io.atomic import read_json, write_json
from curate.io.layout import LAYOUT_VERSION, DatasetDir

_VERSIONED = (
    "pyarrow", "numpy", "pillow", "urllib3", "duckdb", "pyspark", "torch", "open_clip_torch",
    "faiss-cpu", "fasttext-predict", "webdataset",
)


def package_versions() -> dict[str, str]:
    out = {"curate": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def load(ds: DatasetDir) -> dict[str, Any]:
    if ds.manifest.exists():
        return read_json(ds.manifest)
    return {"format": LAYOUT_VERSION, "stages": {}}


def check_fingerprint(ds: DatasetDir, stage: str, fp: str, redo: bool) -> bool:
    """Return True when earlier output of `stage` must be discarded (--redo over another config).

    A different fingerprint without --redo stops with a message naming both fingerprints.
    """
    man = load(ds)
    if man.get("stages") and man.get("format") != LAYOUT_VERSION:
        raise ConfigMismatchError(
            f"{ds.root}: written by an older curate ({man.get('format')}: 5-digit shard ids, 10-character keys); "
            f"this version writes {LAYOUT_VERSION}. Use a new output directory.")
    prev = man["stages"].get(stage)
    if prev is None or prev.get("fingerprint") == fp:
        return bool(redo)
    if not redo:
        raise ConfigMismatchError(
            f"{ds.root}: stage '{stage}' was run with config fingerprint {prev.get('fingerprint')}, "
            f"this run has {fp}. Refusing to mix outputs of two configs in one dataset; "
            f"use the same config to resume, --redo to recompute, or another output directory."
        )
    return True


def record_stage(
    ds: DatasetDir,
    stage: str,
    *,
    config: dict[str, Any],
    fingerprint: str,
    inputs: dict[str, Any] | None = None,
    counts: dict[str, Any] | None = None,
    status: str = "complete",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    man = load(ds)
    entry = {
        "config": config,
        "fingerprint": fingerprint,
        "inputs": inputs or {},
        "counts": counts or {},
        "status": status,
        "versions": package_versions(),
        "updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        entry.update(extra)
    man.setdefault("stages", {})[stage] = entry
    write_json(ds.manifest, man)
    return entry
