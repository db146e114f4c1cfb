"""The shipped demo corpus (openclipart, see README.md here): read a split, or write it as a dataset dir.

Splits: `pool` (what the demo web serves), `seed` (trusted clean pairs to train a filter model) and
`eval` (held-out images labelled with their category). They are disjoint and fixed by a hash of the
image_id (curate/demo/build_corpus.py).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from curate.errors import InputError
from curate.io.atomic import write_json
from curate.io.layout import DatasetDir, sample_key, shard_name
from curate.io.ledger import LEDGER_FIELDS
from curate.io.manifest import check_fingerprint, record_stage
from curate.io.shards import ShardWriter
from curate.io.tables import write_table

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
SPLITS = ("pool", "seed", "eval")
SAMPLES_PER_SHARD = 1000
MARKER_STAGE = "download"


def split_path(name: str) -> Path:
    if name not in SPLITS:
        raise InputError(f"unknown demo split {name!r}; known: {', '.join(SPLITS)}")
    path = CORPUS_DIR / f"{name}.parquet"
    if not path.is_file():
        raise InputError(f"{path} is missing: rebuild the demo corpus with `python -m curate.demo.build_corpus`")
    return path


def load_split(name: str, columns: list[str] | None = None) -> pa.Table:
    """One split as a pyarrow Table (columns: see build_corpus.SCHEMA), in image_id order."""
    import pyarrow.parquet as pq

    return pq.read_table(split_path(name), columns=columns)


def categories(name: str = "eval") -> list[str]:
    """The sorted category labels present in a split (eval: the probe's classes)."""
    return sorted(set(load_split(name, columns=["category"])["category"].to_pylist()))


def corpus_bytes() -> int:
    """Bytes the corpus adds to the package (every file under corpus/)."""
    return sum(p.stat().st_size for p in CORPUS_DIR.iterdir() if p.is_file())


def _ledger_row(key: str, shard: str, row: int, r: dict[str, Any], name: str) -> dict[str, Any]:
    image: bytes = r["image"]
    return {
        "key": key, "shard": shard, "row": row, "url": f"demo://{name}/{r['image_id']}.jpg",
        "caption": r["caption"], "status": "success", "error_code": None, "error_message": None,
        "attempts": 1, "http_status": None, "final_url": None, "bytes": len(image),
        "sha256": hashlib.sha256(image).hexdigest(), "mime": "image/jpeg",
        "orig_width": r["width"], "orig_height": r["height"], "width": r["width"], "height": r["height"],
        "elapsed": 0.0, "duplicate_of": None, "superseded_by": None,
        # kept columns, as download keeps --keep-col columns
        "image_id": r["image_id"], "category": r["category"], "label": r["category"],
    }


def write_split_dataset(name: str, out_dir: str | os.PathLike,
                        samples_per_shard: int = SAMPLES_PER_SHARD) -> Path:
    """Write split `name` as a downloaded dataset dir (shards/, ledger/, stats/ and _done/download/
    markers, manifest), so score, train-probe and dedup read it like any download output.

    Every row is a success; `label` (= category) rides along as a kept column. A dir whose shards are
    all marked done is left as it is (resume); returns the dataset root.
    """
    if samples_per_shard < 1:
        raise InputError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    table = load_split(name)
    ds = DatasetDir.at(out_dir)
    n_shards = max(1, -(-table.num_rows // samples_per_shard))
    shards = [shard_name(i) for i in range(n_shards)]
    fp = f"demo-{name}-{samples_per_shard}"
    check_fingerprint(ds, MARKER_STAGE, fp, redo=False)  # another split or shard size: refuse to mix
    if all(ds.marker(MARKER_STAGE, s).exists() for s in shards):
        return ds.root
    schema = pa.schema([*LEDGER_FIELDS, pa.field("image_id", pa.string()), pa.field("category", pa.string()),
                        pa.field("label", pa.string())])
    rows = table.to_pylist()
    for i, shard in enumerate(shards):
        if ds.marker(MARKER_STAGE, shard).exists():
            continue
        part = rows[i * samples_per_shard:(i + 1) * samples_per_shard]
        ledger = []
        with ShardWriter(ds.shard_tar(shard)) as w:
            for j, r in enumerate(part):
                key = sample_key(shard_name(i), j)
                row = _ledger_row(key, shard, i * samples_per_shard + j, r, name)
                w.write(key, r["image"], "jpg", r["caption"], {k: v for k, v in row.items() if k != "caption"})
                ledger.append(row)
        write_table(ds.ledger(shard), pa.Table.from_pylist(ledger, schema=schema))
        stats = {"rows": len(part), "success": len(part), "source": f"demo:{name}"}
        write_json(ds.stats(MARKER_STAGE, shard), stats)
        write_json(ds.marker(MARKER_STAGE, shard), {"shard": shard, "stats": stats})
    config = {"source": f"demo:{name}", "samples_per_shard": samples_per_shard}
    record_stage(ds, MARKER_STAGE, config=config, fingerprint=fp,
                 inputs={"corpus": str(split_path(name))}, counts={"rows": table.num_rows, "success": table.num_rows})
    return ds.root


def pipeline_dataset(settings: dict[str, Any], path: Path) -> None:
    """The `demo-split` dataset kind of pipelines (curate.services): `split` (seed | eval | pool) and an
    optional `samples_per_shard`, written at `path` once."""
    unknown = sorted(set(settings) - {"split", "samples_per_shard"})
    if unknown:
        raise InputError(f"demo-split dataset: unknown field(s) {', '.join(unknown)}; known: split, samples_per_shard")
    if "split" not in settings:
        raise InputError(f"demo-split dataset: 'split' is required ({', '.join(SPLITS)})")
    write_split_dataset(str(settings["split"]), path, int(settings.get("samples_per_shard", SAMPLES_PER_SHARD)))
