"""Time `curate inspect` and `curate report` on a synthetic dataset of many shards; print seconds, size, RSS.

    .venv/bin/python bench/report.py [--shards 40] [--rows 5000] [--out bench-out/report]

The dataset (ledger, tars, score and dedup tables, an export with dropped.parquet) is built once under
--out and reused by later runs with the same size.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from curate.io.atomic import write_json
from curate.io.layout import DatasetDir, sample_key, shard_name
from curate.io.ledger import LEDGER_FIELDS
from curate.io.manifest import record_stage
from curate.io.shards import ShardWriter
from curate.io.tables import write_table

CODES = ["http_4xx", "timeout", "decode_error", "connect_error", "http_5xx"]


def _jpegs(n: int = 16) -> list[bytes]:
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (i * 15 % 256, i * 45 % 256, i * 85 % 256)).save(buf, "JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def build(root: Path, shards: int, rows: int) -> tuple[Path, Path]:
    ds, ex = DatasetDir.at(root / "ds"), DatasetDir.at(root / "export")
    if ds.manifest.exists() and len(ds.done_shards("dedup")) == shards:
        return ds.root, ex.root
    rng = np.random.default_rng(0)
    images = _jpegs()
    schema = pa.schema(LEDGER_FIELDS)
    kept_keys, dropped_keys, dropped_reason = [], [], []
    for s in range(shards):
        shard = shard_name(s)
        keys = [sample_key(shard, r) for r in range(rows)]
        fail = rng.random(rows) < 0.2
        code = np.where(fail, rng.choice(CODES, rows), None)
        hosts = rng.integers(0, 500, rows)
        urls = [f"http://host{h}.example.com/img/{k}.jpg" for h, k in zip(hosts, keys, strict=True)]
        captions = [f"caption of sample {k}" for k in keys]
        cols = {f.name: pa.nulls(rows, f.type) for f in LEDGER_FIELDS}
        cols.update(key=pa.array(keys), shard=pa.array([shard] * rows), row=pa.array(np.arange(rows) + s * rows),
                    url=pa.array(urls), caption=pa.array(captions),
                    status=pa.array(np.where(fail, code, "success").tolist()), error_code=pa.array(code.tolist()))
        write_table(ds.ledger(shard), pa.table([cols[f.name] for f in LEDGER_FIELDS], schema=schema))
        with ShardWriter(ds.shard_tar(shard)) as w:
            for i in np.flatnonzero(~fail):
                w.write(keys[i], images[i % len(images)], "jpg", captions[i], {"key": keys[i]})
        ok = ~fail
        score = rng.normal(0.28, 0.05, rows).astype(np.float32)
        lang = rng.choice(["en", "en", "en", "de", "it", "fr"], rows)
        write_table(ds.signals("score", shard), pa.table({
            "key": keys, "scored": ok, "skip_reason": np.where(ok, None, code).tolist(),
            "clip_score": pa.array(np.where(ok, score, np.nan), mask=~ok),
            "lang": pa.array(lang, mask=~ok)}))
        group = np.where(rng.random(rows) < 0.05, rng.integers(0, 2000, rows) + s * 2000, -1)
        idx = np.flatnonzero(ok)
        is_dup = (group[idx] >= 0) & (rng.random(len(idx)) < 0.5)
        write_table(ds.signals("dedup", shard), pa.table({
            "key": [keys[i] for i in idx], "dup_group": group[idx], "is_duplicate": is_dup,
            "kept_key": [keys[i] for i in idx], "eval_contaminated": np.zeros(len(idx), bool)}))
        for stage in ("download", "score", "dedup"):
            write_json(ds.marker(stage, shard), {"shard": shard})
        keep = (score[idx] >= 0.28) & (lang[idx] == "en") & ~is_dup
        kept_keys += [keys[i] for i in idx[keep]]
        dropped_keys += [keys[i] for i in idx[~keep]]
        dropped_reason += ["clip_score >= 0.28" if score[i] < 0.28 else "lang = 'en'" if lang[i] != "en"
                           else "NOT is_duplicate" for i in idx[~keep]]
    for stage in ("download", "score", "dedup"):
        record_stage(ds, stage, config={}, fingerprint=stage)
    write_table(ex.ledger("00000"), pa.table({"key": kept_keys}))
    write_json(ex.marker("export", "00000"), {"shard": "00000"})
    write_table(ex.root / "dropped.parquet", pa.table({"key": dropped_keys, "clause": dropped_reason}))
    record_stage(ex, "export", config={}, fingerprint="export", counts={"kept": len(kept_keys)})
    return ds.root, ex.root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=40)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--out", default="bench-out/report")
    a = ap.parse_args()
    root = Path(a.out) / f"{a.shards}x{a.rows}"
    t0 = time.perf_counter()
    ds, ex = build(root, a.shards, a.rows)
    print(f"dataset: {a.shards} shards x {a.rows} rows = {a.shards * a.rows:,} rows "
          f"(built or reused in {time.perf_counter() - t0:.1f}s)")
    from curate.inspect import summarize
    from curate.report.report import build_report

    t0 = time.perf_counter()
    s = summarize(ds)
    print(f"inspect: {time.perf_counter() - t0:.2f}s ({s['ledger']['rows']:,} ledger rows, "
          f"{len(json.dumps(s)):,} bytes of JSON)")
    t0 = time.perf_counter()
    out = build_report(ds, root / "report.html", export_dir=ex)
    print(f"report: {time.perf_counter() - t0:.2f}s, {out.stat().st_size / 1024:.0f} KiB -> {out}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
