"""img2dataset's output layout, written by `curate export --layout img2dataset` and read by `curate adopt`.

img2dataset writes, per shard, flat in its output folder:
    {shard}.tar          webdataset members {key}.jpg (or png/webp), {key}.txt, {key}.json
    {shard}.parquet      one row per input row: url, caption, key, status, error_message, width, height,
                         original_width, original_height, exif, sha256, then any extra input columns
    {shard}_stats.json   count, successes, failed_to_download, failed_to_resize, times, status_dict; last
The export writes the same three files (the stats file last, then curate's own marker), with the
signal and lineage columns of the samples view as extra parquet columns, so the
tools that read img2dataset output read ours unchanged. Times are 0 so engines give identical bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from curate.io.atomic import write_json
from curate.io.ledger import LEDGER_FIELDS
from curate.io.shards import IMAGE_EXTS, ShardWriter
from curate.io.tables import write_table
from curate.io.trainable import is_uid, sample_uid

# img2dataset's own columns, in its order, and the curate ledger field each comes from
COLUMNS: dict[str, tuple[str, pa.DataType]] = {
    "url": ("url", pa.string()), "caption": ("caption", pa.string()), "key": ("key", pa.string()),
    "status": ("status", pa.string()), "error_message": ("error_message", pa.string()),
    "width": ("width", pa.int32()), "height": ("height", pa.int32()),
    "original_width": ("orig_width", pa.int32()), "original_height": ("orig_height", pa.int32()),
    "exif": ("exif", pa.string()), "sha256": ("sha256", pa.string()),
}
_FROM_LEDGER = {src for src, _ in COLUMNS.values()}
_LEDGER_NAMES = {f.name for f in LEDGER_FIELDS}


def shard_files(root: Path, shard: str) -> tuple[Path, Path, Path]:
    """(tar, parquet, stats json) of one shard in an img2dataset folder."""
    return root / f"{shard}.tar", root / f"{shard}.parquet", root / f"{shard}_stats.json"


def img2dataset_table(rows: pa.Table) -> pa.Table:
    """img2dataset's columns first (from the ledger fields), then every other column as an extra column."""
    n = rows.num_rows
    cols: dict[str, pa.Array] = {}
    for name, (src, typ) in COLUMNS.items():
        if src in rows.column_names:
            cols[name] = rows[src].cast(typ)
        else:
            cols[name] = pa.nulls(n, typ)
    for name in rows.column_names:  # signals and lineage; curate's bookkeeping fields stay in curate
        if name not in _FROM_LEDGER and name not in _LEDGER_NAMES and name not in cols:
            cols[name] = rows[name]
    return pa.table(cols)


def sample_json(row: dict[str, Any]) -> bytes:
    """The {key}.json member: img2dataset's meta fields for one sample, and the uid DataComp's tools match."""
    meta = {name: row.get(name) for name in COLUMNS}
    if row.get("uid") is not None and not is_uid(row.get("uid")):
        meta["source_uid"] = row["uid"]
    meta["uid"] = sample_uid(row)
    return json.dumps(meta, indent=4, default=str).encode("utf-8")


def write_img2dataset_shard(root: Path, shard: str, rows: pa.Table, members: dict[str, dict[str, bytes]]) -> None:
    """Write one shard's tar, parquet and stats json; image bytes are the source's, untouched."""
    tar, parquet, stats = shard_files(root, shard)
    table = img2dataset_table(rows)
    with ShardWriter(tar) as w:
        for row in table.to_pylist():
            got = members[row["key"]]
            out = {ext: data for ext, data in got.items() if ext in IMAGE_EXTS}
            out["txt"] = got["txt"] if "txt" in got else (row["caption"] or "").encode("utf-8")
            out["json"] = sample_json(row)
            w.write_raw(row["key"], out)
    write_table(parquet, table)
    n = table.num_rows
    write_json(stats, {"count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0,
                       "duration": 0.0, "start_time": 0.0, "end_time": 0.0, "status_dict": {"success": n} if n else {}})


def discard_img2dataset_files(root: Path, shards: list[str]) -> None:
    """Remove the flat img2dataset files of an earlier export's shards (--redo); nothing else in `root`."""
    for shard in shards:
        for p in shard_files(root, shard):
            p.unlink(missing_ok=True)
    (root / "sizes.json").unlink(missing_ok=True)


def publish_img2dataset(root: Path, url: str, shards: list[str]) -> None:
    """Copy each shard's three files to an fsspec URL, the stats json (img2dataset's marker) last."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(url)
    fs.makedirs(base, exist_ok=True)
    for shard in shards:
        files = shard_files(root, shard)
        if fs.exists(f"{base}/{files[2].name}"):
            continue
        for local in files:
            fs.put_file(str(local), f"{base}/{local.name}")
    if (root / "sizes.json").exists():
        fs.put_file(str(root / "sizes.json"), f"{base}/sizes.json")
