"""Write a synthetic *scored* dataset in the real layout, shard by shard, for the scale benchmarks.

    python bench/synth_scored.py OUT --rows 1M [--rows-per-shard 10000] [--tars] [--seed 0]

Per shard: a download ledger (every row a success), a score signal table (clip_score, lang, ...),
float16 L2-normalised 512-d image embeddings, and the download/score markers; with --tars also a
webdataset tar holding one tiny JPEG per sample (what `curate export` copies; about 1 KB a sample).
The embeddings imitate CLIP image embeddings (a cone around one direction, grouped in topics), and
10% of the rows are planted near copies (cosine 0.96-0.995) of an earlier row of the same or the
previous shard; OUT/planted.parquet lists (copy key, original key) for measuring recall.
Memory stays at a couple of shards whatever --rows is.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DIM = 512


def parse_count(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "kmb" else s) * mult)


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _tiny_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 80, 40)).save(buf, "JPEG", quality=50)
    return buf.getvalue()


def generate(out: Path, rows: int, rows_per_shard: int = 10_000, tars: bool = False, seed: int = 0,
             dup_share: float = 0.1) -> dict[str, int]:
    """Write the dataset under `out`; returns {"rows", "shards", "planted"}.

    Long because each shard's ledger, tar, score table and embeddings are written in one pass so that the
    planted duplicates stay consistent across the four files.
    """
    from curate.io import manifest
    from curate.io.atomic import write_json
    from curate.io.layout import DatasetDir, sample_key, shard_name
    from curate.io.ledger import LEDGER_FIELDS
    from curate.io.shards import ShardWriter
    from curate.io.tables import write_table
    from curate.stages.score import signal_schema, write_npy

    rng = np.random.default_rng(seed)
    ds = DatasetDir.at(out)
    ds.root.mkdir(parents=True, exist_ok=True)
    topics = max(1, rows // 1000)
    mean = _unit(rng.standard_normal(DIM))
    # topic centres are drawn on demand from a seeded generator: no (topics x 512) table held
    led_schema, sig_schema = pa.schema(LEDGER_FIELDS), signal_schema()
    jpg = _tiny_jpeg() if tars else b""
    planted = pq.ParquetWriter(str(ds.root / "planted.parquet"),
                               pa.schema([("copy", pa.string()), ("original", pa.string())]))
    prev_emb: np.ndarray | None = None
    prev_keys: list[str] = []
    n_planted = 0
    n_shards = (rows + rows_per_shard - 1) // rows_per_shard
    for s in range(n_shards):
        shard = shard_name(s)
        n = min(rows_per_shard, rows - s * rows_per_shard)
        keys = [sample_key(shard, j) for j in range(n)]
        t = rng.integers(topics, size=n)
        uniq, inv = np.unique(t, return_inverse=True)
        table = np.stack([_unit(0.6 * mean + 0.8 * _unit(np.random.default_rng((seed, int(k))).standard_normal(DIM)))
                          for k in uniq]) if n else np.zeros((0, DIM))
        centres = table[inv]
        z = rng.standard_normal((n, DIM)).astype(np.float32) / np.sqrt(DIM)
        emb = _unit(0.75 * centres + 0.66 * z).astype(np.float32)
        # planted copies: a row becomes a near copy of an earlier row (this shard's first part, or the last shard)
        is_copy = rng.random(n) < dup_share
        is_copy[: max(1, n // 10)] = False
        copies, originals = [], []
        for j in np.flatnonzero(is_copy):
            if prev_emb is not None and rng.random() < 0.5:
                o = int(rng.integers(len(prev_keys)))
                base, okey = prev_emb[o].astype(np.float32), prev_keys[o]
            else:
                o = int(rng.integers(max(1, n // 10)))
                base, okey = emb[o], keys[o]
            c = float(rng.uniform(0.96, 0.995))
            noise = rng.standard_normal(DIM)
            noise = _unit(noise - (noise @ base) * base)  # orthogonal to the original: cosine is exactly c
            emb[j] = _unit(c * base + np.sqrt(1 - c * c) * noise)
            copies.append(keys[j])
            originals.append(okey)
        emb16 = emb.astype(np.float16)
        if copies:
            planted.write_table(pa.table({"copy": copies, "original": originals}))
            n_planted += len(copies)
        sha = [f"{s:016x}{j:048x}" for j in range(n)]
        led = {f.name: pa.nulls(n, f.type) for f in LEDGER_FIELDS}
        led.update(key=pa.array(keys), shard=pa.array([shard] * n), row=pa.array(np.arange(n) + s * rows_per_shard),
                   url=pa.array([f"http://10.0.{s % 250}.{j % 250}/{k}.jpg" for j, k in enumerate(keys)]),
                   caption=pa.array([f"a photo number {k}" for k in keys]), status=pa.array(["success"] * n),
                   sha256=pa.array(sha), width=pa.array(np.full(n, 256, np.int32)),
                   height=pa.array(np.full(n, 256, np.int32)), bytes=pa.array(np.full(n, len(jpg), np.int64)))
        write_table(ds.ledger(shard), pa.table(led, schema=led_schema))
        sig = {f.name: pa.nulls(n, f.type) for f in sig_schema}
        sig.update(key=pa.array(keys), scored=pa.array([True] * n),
                   clip_score=pa.array(rng.normal(0.3, 0.04, n).astype(np.float32)),
                   lang=pa.array(np.where(rng.random(n) < 0.7, "en", "de").tolist()),
                   width=pa.array(np.full(n, 256, np.int32)), height=pa.array(np.full(n, 256, np.int32)),
                   emb_row=pa.array(np.arange(n, dtype=np.int32)))
        write_table(ds.signals("score", shard), pa.table(sig, schema=sig_schema))
        write_npy(ds.signals("score", shard, ".img_emb.npy"), emb16)
        if tars:
            with ShardWriter(ds.shard_tar(shard)) as w:
                for k in keys:
                    w.write_raw(k, {"jpg": jpg})
        write_json(ds.marker("download", shard), {"task": shard})
        write_json(ds.marker("score", shard), {"task": shard})
        prev_emb, prev_keys = emb16, keys
    planted.close()
    for stage in ("download", "score"):
        manifest.record_stage(ds, stage, config={"synthetic": True, "seed": seed}, fingerprint=f"synthetic-{seed}",
                              counts={"rows": rows})
    return {"rows": rows, "shards": n_shards, "planted": n_planted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--rows", default="100k")
    ap.add_argument("--rows-per-shard", type=int, default=10_000)
    ap.add_argument("--tars", action="store_true", help="also write tars (one tiny JPEG per sample), for export")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.time()
    got = generate(Path(a.out), parse_count(a.rows), a.rows_per_shard, a.tars, a.seed)
    print(f"synthetic scored dataset: {got['rows']:,} rows in {got['shards']:,} shards, {got['planted']:,} planted "
          f"near copies, {time.time() - t0:.1f}s -> {a.out}")


if __name__ == "__main__":
    main()
