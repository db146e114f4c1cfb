"""The files that training code reads beside an export's tars, so it reads the export as it is.

- `sizes.json` in the tars' folder: `{"00000000.tar": n, ...}`, what open_clip's webdataset reader
  (`open_clip_train.data.get_dataset_size`) and DataComp's resharder (`--shard-table`) read for the
  number of samples, so no `--train-num-samples` is needed.
- `{shard}_stats.json` beside each tar: `{"count": n, "successes": n}`, what DataComp's resharder reads
  per shard (and what img2dataset writes).
- a `uid` in each sample's json: 32 hex digits (128 bits), what DataComp's resharder matches against a
  subset file. The source's own `uid` (DataComp's pools, `--preset datacomp`) is kept; otherwise it is
  the first 128 bits of SHA-256 over the sample's URL and caption, so it is stable across runs.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from curate.io.atomic import write_json

SIZES = "sizes.json"
_HEX_UID = re.compile(r"[0-9a-f]{1,32}")


def shard_stats_path(tar: Path) -> Path:
    """`{shard}_stats.json` beside `{shard}.tar`."""
    return tar.with_name(f"{tar.stem}_stats.json")


def write_shard_stats(tar: Path, samples: int) -> None:
    write_json(shard_stats_path(tar), {"count": samples, "successes": samples})


def write_sizes(folder: Path, sizes: dict[str, int]) -> None:
    """sizes.json: tar file name -> samples, in name order."""
    write_json(folder / SIZES, {name: int(sizes[name]) for name in sorted(sizes)})


def derived_uid(url: Any, caption: Any) -> str:
    text = f"{url or ''}\n{caption or ''}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(text).hexdigest()[:32]


def is_uid(value: Any) -> bool:
    """A uid DataComp's tools can read: a string of at most 32 lowercase hex digits."""
    return isinstance(value, str) and bool(_HEX_UID.fullmatch(value))


def sample_uid(row: dict[str, Any]) -> str:
    """The row's own uid when it is one (see is_uid), else derived_uid of its URL and caption."""
    uid = row.get("uid")
    return uid if is_uid(uid) else derived_uid(row.get("url"), row.get("caption"))


def with_uid(meta_json: bytes | None, uid: str) -> bytes:
    """A sample's json member with `uid` set; a `uid` there that DataComp's tools cannot read (not hex) is
    kept as `source_uid`. Keys sorted, as download writes them."""
    meta = json.loads(meta_json) if meta_json else {}
    if not isinstance(meta, dict):
        meta = {"meta": meta}
    old = meta.get("uid")
    if old is not None and not is_uid(old):
        meta["source_uid"] = old
    meta["uid"] = old if is_uid(old) else uid
    return json.dumps(meta, sort_keys=True, default=str).encode("utf-8")
