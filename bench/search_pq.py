"""IVF-PQ's recall on text-like queries against the rerank depth, on the synthetic embeddings (index only).

    python bench/search_pq.py [--n 200k] [--nlist 1024] [--depths 200,500,1000] [--probes 16,32,64,128,256]

What `curate index` builds when the float16 lists do not fit --memory-budget is IVF{nlist},PQ64, and each
search reranks the index's best candidates by their exact cosine. This measures that trade-off without the
dataset layout: embeddings drawn as bench/synth_scored.py draws them (512-d, topics of ~1,000 rows, a cone
around one direction; no planted copies), written to a float16 scratch file, a faiss IVF-PQ index trained on 64
rows a list, and 300 text-like queries (cosine 0.3 to a row, the rest a random direction) whose recall@10 is
measured against brute force for each nprobe and each rerank depth. The pipeline's own path (row store,
memory-mapped embedding files per shard) is bench/search.py with a small --memory-budget.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_scored import parse_count  # noqa: E402

D, RPS, NQ = 512, 10_000, 300


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def shard(job: tuple[str, int, int]) -> int:
    """Rows [s * RPS, ...) of the scratch file, from their own seeded generator."""
    path, n, s = job
    seed, topics = 0, max(1, n // 1000)
    rng = np.random.default_rng((seed, 7, s))
    mean = unit(np.random.default_rng(seed).standard_normal(D))
    m = min(RPS, n - s * RPS)
    uniq, inv = np.unique(rng.integers(topics, size=m), return_inverse=True)
    table = np.stack([unit(0.6 * mean + 0.8 * unit(np.random.default_rng((seed, int(k))).standard_normal(D)))
                      for k in uniq])
    z = rng.standard_normal((m, D)).astype(np.float32) / np.sqrt(D)
    x = np.lib.format.open_memmap(path, mode="r+")
    x[s * RPS:s * RPS + m] = unit(0.75 * table[inv] + 0.66 * z).astype(np.float16)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="200k")
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--depths", default="200,500,1000", help="Rerank depths (candidates read by exact cosine).")
    ap.add_argument("--probes", default="16,32,64,128,256")
    args = ap.parse_args()
    n, depths = parse_count(args.n), [int(d) for d in args.depths.split(",")]
    scratch = Path(tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)) / "x16.npy"
    try:
        run(args.nlist, n, depths, [int(p) for p in args.probes.split(",")], scratch)
    finally:
        scratch.unlink(missing_ok=True)
        scratch.parent.rmdir()


def run(nlist: int, n: int, depths: list[int], probes: list[int], scratch: Path) -> None:
    import faiss

    t0 = time.time()
    np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float16, shape=(n, D))
    with Pool(2) as p:
        p.map(shard, [(str(scratch), n, s) for s in range((n + RPS - 1) // RPS)], chunksize=8)
    x16 = np.load(scratch, mmap_mode="r")
    print(f"data: {n:,} x {D} float16, {time.time() - t0:.1f}s", flush=True)
    rng = np.random.default_rng(5)
    x = x16[np.sort(rng.choice(n, NQ, replace=False))].astype(np.float32)
    u = rng.standard_normal(x.shape).astype(np.float32)
    u = unit(u - np.sum(u * x, 1, keepdims=True) * x)
    text = (0.3 * x + math.sqrt(1 - 0.09) * u).astype(np.float32)
    best = np.full((NQ, 10), -np.inf, np.float32)
    for c in range(0, n, 200_000):
        best = np.partition(np.concatenate([best, text @ x16[c:c + 200_000].astype(np.float32).T], 1), -10, 1)[:, -10:]
    kth = best.min(axis=1, keepdims=True)
    factory = f"IVF{nlist},PQ64"
    index = faiss.index_factory(D, factory, faiss.METRIC_INNER_PRODUCT)
    t0 = time.time()
    train = np.sort(np.random.default_rng(1).choice(n, min(n, 64 * nlist), replace=False))
    index.train(x16[train].astype(np.float32))
    for c in range(0, n, 200_000):
        index.add(x16[c:c + 200_000].astype(np.float32))
    print(f"index: {factory}, trained on {len(train):,} rows, built in {time.time() - t0:.1f}s", flush=True)
    ivf = faiss.extract_index_ivf(index)
    print(f"text-like recall@10 over {NQ} queries, by rerank depth {', '.join(map(str, depths))}:")
    for nprobe in probes:
        ivf.nprobe = nprobe
        _, ids = index.search(text, max(depths))
        recalls = []
        for depth in depths:
            cand = ids[:, :depth]
            sims = np.einsum("qkd,qd->qk", x16[np.maximum(cand, 0).ravel()].astype(np.float32)
                             .reshape(*cand.shape, D), text)
            sims[cand < 0] = -np.inf
            top = -np.sort(-sims, axis=1)[:, :10]
            recalls.append(f"{float(np.mean(top >= kth - 1e-4)):.4f}")
        print(f"  nprobe {nprobe:>4}: {' '.join(recalls)}", flush=True)


if __name__ == "__main__":
    main()
