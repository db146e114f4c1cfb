"""manifest.json: each stage's resolved config, fingerprint, package versions, inputs and counts.

Only drivers write the manifest (never a shard task), under `lock.manifest_lock`, so two stages'
drivers cannot lose each other's entries. A Slurm array task writes its own fragment
DIR/_manifest/{stage}/{i}-of-{n}.json instead, and `load` merges the fragments into the stage's
entry (complete when every index is). A "running" entry whose owner process is gone reads as
"interrupted", so a crash never leaves a manifest that claims a live run.
"""

from __future__ import annotations

import datetime as dt
import platform
import sys
from importlib import metadata
from typing import Any

from curate import __version__
from curate.errors import ConfigMismatchError
from curate.io.atomic import TMP_PREFIX, read_json, write_json
from curate.io.layout import LAYOUT_VERSION, DatasetDir
from curate.io.lock import manifest_lock, owner_info, process_alive

_VERSIONED = (
    "pyarrow", "numpy", "pillow", "urllib3", "duckdb", "pyspark", "torch", "open_clip_torch",
    "faiss-cpu", "faiss-gpu", "fasttext-predict", "webdataset",
    # download's optional fast paths (outputs differ from Pillow's by a grey level or two)
    "pywuffs", "webp", "opencv-python-headless", "opencv-python",
)


def package_versions() -> dict[str, str]:
    out = {"curate": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _raw(ds: DatasetDir) -> dict[str, Any]:
    if ds.manifest.exists():
        return read_json(ds.manifest)
    return {"format": LAYOUT_VERSION, "stages": {}}


def _settle(entry: dict[str, Any]) -> dict[str, Any]:
    """A "running" entry whose owner died on this host is reported as "interrupted"."""
    owner = entry.get("owner") or {}
    if entry.get("status") == "running" and owner.get("pid"):
        if process_alive(owner["pid"], owner.get("host")) is False:
            entry = {**entry, "status": "interrupted"}
    return entry


def _fragments(ds: DatasetDir, stage: str) -> list[dict[str, Any]]:
    folder = ds.manifest_fragments_dir(stage)
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.glob("*-of-*.json")):
        if p.name.startswith("."):
            continue
        try:
            out.append(_settle(read_json(p)))
        except (OSError, ValueError):
            continue
    return out


def _merge(entry: dict[str, Any] | None, frags: list[dict[str, Any]]) -> dict[str, Any]:
    """One stage entry from the array tasks' fragments (and the plan run's entry, if any)."""
    fp = frags[-1]["fingerprint"] if entry is None else entry.get("fingerprint")
    frags = [f for f in frags if f.get("fingerprint") == fp]
    if not frags:
        return entry or {}
    count = max(int(f["slice"][1]) for f in frags)
    by_index = {int(f["slice"][0]): f for f in frags if int(f["slice"][1]) == count}
    statuses = [f.get("status") for f in by_index.values()]
    if len(by_index) == count and all(s == "complete" for s in statuses):
        status = "complete"
    elif any(s == "running" for s in statuses):
        status = "running"
    else:
        status = "incomplete"
    # each task's counts cover every shard done when it finished; they only grow, so the largest are
    # the most complete (those of a task that finished after all the others' shards)
    latest = max(by_index.values(), key=lambda f: (_size(f.get("counts") or {}), f.get("updated", "")))
    merged = {**(entry or latest), "status": status, "counts": latest.get("counts", {}),
              "updated": latest.get("updated"),
              "slices": {f"{i}-of-{count}": by_index[i].get("status") for i in sorted(by_index)}}
    failed = sorted({t for f in by_index.values() for t in (f.get("shards") or {}).get("failed", [])})
    merged["shards"] = {**(merged.get("shards") or {}), "failed": failed}
    merged.pop("owner", None)
    merged.pop("slice", None)
    return merged


def _size(counts: dict[str, Any]) -> float:
    return sum(v for v in counts.values() if isinstance(v, (int, float)) and not isinstance(v, bool))


def load(ds: DatasetDir) -> dict[str, Any]:
    """The manifest as readers see it: array fragments merged, dead "running" entries settled."""
    man = _raw(ds)
    stages = {k: _settle(v) for k, v in man.get("stages", {}).items()}
    root = ds.root / "_manifest"
    if root.is_dir():
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            frags = _fragments(ds, folder.name)
            if frags:
                stages[folder.name] = _merge(stages.get(folder.name), frags)
    man["stages"] = stages
    return man


def check_fingerprint(ds: DatasetDir, stage: str, fp: str, redo: bool) -> bool:
    """Return True when earlier output of `stage` must be discarded (--redo over another config).

    A different fingerprint without --redo stops with a message naming both fingerprints.
    """
    man = load(ds)
    if man.get("stages") and _raw(ds).get("format") != LAYOUT_VERSION:
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
    array_slice: tuple[int, int] | None = None,
    engine: str | None = None,
) -> dict[str, Any]:
    """Record `stage`'s entry: in manifest.json, or in this array task's own fragment (`engine`: where its
    tasks and driver-side SQL ran, local or spark)."""
    import shutil

    entry = {
        "config": config,
        "fingerprint": fingerprint,
        "inputs": inputs or {},
        "counts": counts or {},
        "status": status,
        "versions": package_versions(),
        "updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if engine:
        entry["engine"] = engine
    if extra:
        entry.update(extra)
    if status == "running":
        entry["owner"] = owner_info()
    if array_slice is not None:
        entry["slice"] = list(array_slice)
        write_json(ds.manifest_fragment(stage, *array_slice), entry)
        return entry
    with manifest_lock(ds):
        # a manifest temp file is only ever written under this lock: any found now is a killed writer's
        for p in ds.root.glob(f"{TMP_PREFIX}*-manifest.json"):
            p.unlink(missing_ok=True)
        man = _raw(ds)
        man["format"] = LAYOUT_VERSION
        man.setdefault("stages", {})[stage] = entry
        write_json(ds.manifest, man)
        # a run over the whole stage (or a new plan) supersedes what earlier array tasks reported
        shutil.rmtree(ds.manifest_fragments_dir(stage), ignore_errors=True)
    return entry
