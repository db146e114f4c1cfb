"""Benchmark the search index: 1M x 512 synthetic CLIP-like embeddings through `curate index`'s stage, then
recall@10 against brute force and single-query latency on held-out queries.

    python bench/search.py [--n 1M] [--data clustered|continuum] [--queries 1000] [--shard-rows 100k]

The embeddings are bench/dedup.py's CLIP-like generator (a cone around one direction, ~1000-row topics,
10% near-copies), written as a scored dataset dir (signals/score/{shard}.parquet + .img_emb.npy float16,
markers), so the index is built by the real stage: seeded training sample, one task per shard, merge,
nprobe tuned on held-out rows. The queries are fresh rows from the same generator, never indexed.
Prints the build time, the chosen index and nprobe, recall@10 (exact top-10 set overlap, and with ties
counted), p50/p95 single-query latency (one query per call, one thread, as a search page sends them),
the index size and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dedup import parse_size, synth  # noqa: E402 - the project's CLIP-like generator, shared with bench/dedup.py


def continuum(n: int, d: int, seed: int = 0, rank: int = 64, chunk: int = 100_000) -> np.ndarray:
    """Harder data without topics: a cone around one direction, spread over a rank-64 subspace with a
    power-law spectrum (CLIP embeddings' effective rank is low) plus a little isotropic noise. No cluster
    lines up with an IVF list, so nprobe has to grow to reach the same recall."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0].astype(np.float32)
    scales = (1.0 / np.sqrt(np.arange(1, rank + 1))).astype(np.float32)
    mean = rng.standard_normal(d).astype(np.float32)
    mean /= np.linalg.norm(mean)
    out = np.empty((n, d), np.float16)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = (rng.standard_normal((m, rank), dtype=np.float32) * scales) @ basis.T
        x += 0.15 * rng.standard_normal((m, d), dtype=np.float32) / np.sqrt(d)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x = 0.6 * mean + 0.8 * x
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def write_dataset(root: Path, emb: np.ndarray, shard_rows: int) -> None:
    """A scored dataset dir holding `emb` (what `curate score` writes, minus the tars and ledgers)."""
    import pyarrow as pa

    from curate.io.atomic import write_json
    from curate.io.layout import DatasetDir, sample_key, shard_name
    from curate.io.manifest import record_stage
    from curate.io.tables import write_table
    from curate.stages.score import write_npy

    ds = DatasetDir.at(root)
    for i, s in enumerate(range(0, len(emb), shard_rows)):
        shard = shard_name(i)
        part = emb[s:s + shard_rows]
        keys = [sample_key(shard, j) for j in range(len(part))]
        write_table(ds.signals("score", shard), pa.table({
            "key": pa.array(keys, pa.string()), "scored": pa.array(np.ones(len(part), bool)),
            "emb_row": pa.array(np.arange(len(part), dtype=np.int32))}))
        write_npy(ds.signals("score", shard, ".img_emb.npy"), np.ascontiguousarray(part))
        write_json(ds.marker("score", shard), {"shard": shard, "stats": {"rows": len(part)}})
    record_stage(ds, "score", config={"bench": "synthetic"}, fingerprint="bench-search")


def exact_topk(emb: np.ndarray, q: np.ndarray, k: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids) of the exact top-k, streamed over row blocks."""
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    for s in range(0, len(emb), chunk):
        sims = q @ emb[s:s + chunk].astype(np.float32).T
        cat_s = np.concatenate([best_s, sims], axis=1)
        cat_i = np.concatenate([best_i, np.arange(s, s + sims.shape[1])[None, :].repeat(len(q), 0)], axis=1)
        top = np.argpartition(-cat_s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cat_s, top, 1), np.take_along_axis(cat_i, top, 1)
    o = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_s, o, 1), np.take_along_axis(best_i, o, 1)


def main() -> None:
    # long because it is a flat script: arguments, synthetic vectors, index build, timed queries, print
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="1M")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--shard-rows", default="100k")
    ap.add_argument("--memory-budget", default="4G")
    ap.add_argument("--kind", default="auto")
    ap.add_argument("--data", choices=["clustered", "continuum"], default="clustered",
                    help="clustered: bench/dedup.py's topics and near-copies; continuum: see continuum().")
    ap.add_argument("--out", default="bench-out/search")
    ap.add_argument("--keep", action="store_true", help="Keep the dataset dir (1M x 512: ~1 GB of embeddings).")
    args = ap.parse_args()
    import faiss

    from curate.engines import EngineSpec
    from curate.runner import run_stage
    from curate.search.build import IndexConfig, parse_bytes

    n, k = parse_size(args.n), 10
    out = Path(args.out)
    root = out / "ds"
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.time()
    if args.data == "clustered":
        emb, _, _ = synth(n + args.queries, args.dim, seed=0)
    else:
        emb = continuum(n + args.queries, args.dim, seed=0)
    perm = np.random.default_rng(1).permutation(len(emb))
    queries = emb[perm[n:]].astype(np.float32)
    emb = emb[np.sort(perm[:n])]  # held-out queries: fresh rows, base rows and near-copies alike
    write_dataset(root, emb, parse_size(args.shard_rows))
    print(f"data ({args.data}): {n} x {args.dim} float16 in {time.time() - t0:.1f}s")

    cfg = IndexConfig(kind=args.kind, memory_budget=parse_bytes(args.memory_budget))
    t0 = time.time()
    summary = run_stage("index", cfg, str(root), EngineSpec("local", 1), progress=False)
    build_s = time.time() - t0
    assert summary.ok, summary.failed
    meta = json.loads((root / "index" / "index.json").read_text())
    info = meta["modalities"]["image"]
    index = faiss.read_index(str(root / "index" / info["file"]))
    if meta["nlist"]:
        faiss.extract_index_ivf(index).nprobe = info["nprobe"]

    t0 = time.time()
    gt_s, gt_i = exact_topk(emb, queries, k)
    brute_s = time.time() - t0
    faiss.omp_set_num_threads(1)  # one query per call: threads only add overhead
    lat, found = [], []
    for i in range(len(queries)):
        t = time.perf_counter()
        _, ids = index.search(queries[i:i + 1], k)
        lat.append(time.perf_counter() - t)
        found.append(ids[0])
    found_i = np.stack(found)
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(found_i, gt_i, strict=True)])
    found_s = np.einsum("qkd,qd->qk", emb[np.maximum(found_i, 0)].astype(np.float32), queries)
    with_ties = np.mean(found_s >= gt_s[:, -1:] - 1e-4)
    lat_ms = np.array(lat) * 1e3
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = (root / "index" / info["file"]).stat().st_size
    print(f"index: {meta['factory']} ({meta['kind']}), nlist {meta['nlist']}, nprobe {info['nprobe']} "
          f"(tuned on {info['queries']} held-out rows to recall {info['recall']}), trained on {meta['train_rows']} rows")
    print(f"build (train + {summary.shards_total} shard tasks + merge + tune): {build_s:.1f}s; brute force for "
          f"{len(queries)} queries: {brute_s:.1f}s")
    print(f"recall@10 vs brute force, {len(queries)} held-out queries: {overlap:.4f} (set overlap), "
          f"{with_ties:.4f} (ties counted)")
    print(f"single-query latency: p50 {np.percentile(lat_ms, 50):.2f} ms, p95 {np.percentile(lat_ms, 95):.2f} ms, "
          f"p99 {np.percentile(lat_ms, 99):.2f} ms")
    print(f"index size: {size / 1e6:.1f} MB ({size / n:.0f} bytes/vector); peak RSS {rss:.0f} MB")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
