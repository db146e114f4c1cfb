"""Publish a finished local dataset directory to any fsspec URL (s3://, gs://, hdfs://, memory://, ...).

Stages write to a local staging directory with the usual atomic rules; each completed shard is then
copied to the URL with its marker copied last, so a reader of the remote copy sees a shard as done only
when all of its files are there. A rerun copies only what the remote side does not have yet.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from curate.io.layout import DatasetDir


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def staging_dir(url: str, base: str | None = None) -> Path:
    """A stable local staging folder for `url` (so a rerun resumes where it stopped)."""
    root = Path(base or os.environ.get("CURATE_STAGING", Path.home() / ".cache" / "curate" / "staging"))
    return root / hashlib.sha256(url.encode()).hexdigest()[:16]


def publish(ds: DatasetDir, url: str, stage: str) -> int:
    """Copy every shard of `stage` that has a local marker and no remote one; returns shards copied."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    copied = 0
    for shard in ds.done_shards(stage):
        remote_marker = f"{root}/_done/{stage}/{shard}.json"
        if fs.exists(remote_marker):
            continue
        tar = ds.shard_tar(shard)
        stats_beside = tar.with_name(f"{shard}_stats.json")  # an export's, for DataComp's tools
        for local in (tar, stats_beside, ds.ledger(shard), ds.stats(stage, shard), ds.marker(stage, shard)):
            if local.exists():
                rel = local.relative_to(ds.root).as_posix()
                fs.makedirs(f"{root}/{rel.rsplit('/', 1)[0]}", exist_ok=True)
                fs.put_file(str(local), f"{root}/{rel}")
        copied += 1
    for extra in ("manifest.json", "dropped.parquet", "shards/sizes.json"):
        if (ds.root / extra).exists():
            fs.makedirs(f"{root}/{extra.rsplit('/', 1)[0]}" if "/" in extra else root, exist_ok=True)
            fs.put_file(str(ds.root / extra), f"{root}/{extra}")
    return copied
