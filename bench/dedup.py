"""Benchmark dedup: synthetic 512-d unit vectors with planted near-duplicate groups at several sizes.

    python bench/dedup.py [--sizes 100k,300k,1M] [--stage-size 100k] [--out bench-out/dedup]

Per size (each in its own process, so peak RSS is that size's): wall time of the numeric core (k-means,
assignment, per-cluster pair search, union, keep), peak RSS, recall of the planted pairs (both ends in one
group), agreement with an exact brute-force range search for 1000 sampled queries (500 random rows, 500
planted copies), and the scaling exponent between sizes. With --stage-size, the same data also goes through `curate dedup`'s stage
(work files, tasks, signal tables) on a dataset dir of 1000-row shards.

The data imitate CLIP image embeddings: all vectors lie in a cone around one direction (mean pairwise cosine
~0.2), grouped in topics (cosine ~0.56 within a topic); 10% of the rows are copies of another row at cosine
0.96-0.995 (re-encoded/resized images), several copies of one original forming a group.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

THRESHOLD = 0.95


def parse_size(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "km" else s) * mult)


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def synth(n: int, d: int = 512, seed: int = 0, dup_share: float = 0.1, lo: float = 0.96, hi: float = 0.995,
          chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float16 embeddings (n, d), original row of each planted copy, the copy rows)."""
    rng = np.random.default_rng(seed)
    topics = max(1, n // 1000)
    mean = unit(rng.standard_normal(d))
    centers = unit(0.6 * mean + 0.8 * unit(rng.standard_normal((topics, d)))).astype(np.float32)
    n_copy = int(n * dup_share)
    n_base = n - n_copy
    emb = np.empty((n, d), np.float16)
    for s in range(0, n_base, chunk):
        m = min(chunk, n_base - s)
        t = rng.integers(topics, size=m)
        z = rng.standard_normal((m, d), dtype=np.float32) / np.sqrt(d)
        emb[s:s + m] = unit(0.75 * centers[t] + 0.66 * z)
    orig = rng.choice(n_base, size=n_copy, replace=True)
    cos = rng.uniform(lo, hi, size=n_copy).astype(np.float32)[:, None]
    for s in range(0, n_copy, chunk):
        m = min(chunk, n_copy - s)
        x = emb[orig[s:s + m]].astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        z = rng.standard_normal((m, d), dtype=np.float32)
        z = unit(z - np.sum(z * x, axis=1, keepdims=True) * x)  # orthogonal to x: the cosine is exactly `cos`
        c = cos[s:s + m]
        emb[n_base + s:n_base + s + m] = c * x + np.sqrt(1 - c**2) * z
    return emb, orig, np.arange(n_base, n)


def brute_force_agreement(emb: np.ndarray, i: np.ndarray, j: np.ndarray, nn_sim: np.ndarray, queries: np.ndarray,
                          chunk: int = 65536) -> dict[str, float]:
    """Exact range search (all rows) for `queries`: recall/precision of the found pairs and nn_similarity.

    Column blocks of the (queries x rows) similarity matrix are scanned once, so memory stays at one block.
    """
    q = emb[queries].astype(np.float32)
    exact_nn = np.full(len(queries), -np.inf, np.float32)
    truth: set[tuple[int, int]] = set()
    for s in range(0, len(emb), chunk):
        sims = q @ emb[s:s + chunk].astype(np.float32).T
        own = (queries >= s) & (queries < s + sims.shape[1])
        sims[np.flatnonzero(own), queries[own] - s] = -np.inf  # a row is not its own neighbour
        np.maximum(exact_nn, sims.max(axis=1), out=exact_nn)
        a, b = np.nonzero(sims >= THRESHOLD)
        truth.update(zip(queries[a].tolist(), (b + s).tolist(), strict=True))
    qset = set(queries.tolist())
    found = set()
    for a, b in zip(i.tolist(), j.tolist(), strict=True):
        if a in qset:
            found.add((a, b))
        if b in qset:
            found.add((b, a))
    hit = len(truth & found)
    same = np.abs(exact_nn - nn_sim[queries]) < 1e-4
    dup = exact_nn >= THRESHOLD
    # nn_similarity is searched within the probed clusters: exact for duplicates, a lower bound far away
    return {"queries": len(queries), "true_pairs": len(truth), "range_recall": hit / max(1, len(truth)),
            "range_precision": hit / max(1, len(found)), "nn_agree_dup": float(np.mean(same[dup])),
            "nn_agree_all": float(np.mean(same))}


def run_core(n: int, seed: int) -> dict[str, object]:
    from curate import semdedup as sd

    emb, orig, copies = synth(n, seed=seed)
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t = {}
    t0 = time.perf_counter()
    k = sd.choose_k(n)
    centroids = sd.train_centroids(emb, k, seed)
    t["train"] = time.perf_counter() - t0
    ids, csim = sd.assign(emb, centroids, 2)
    t["assign"] = time.perf_counter() - t0 - t["train"]
    n_tasks = max(1, -(-n // 65536))
    bounds = np.linspace(0, k, n_tasks + 1).round().astype(int)
    results = [sd.cluster_pairs(emb, ids, range(bounds[a], bounds[a + 1]), THRESHOLD) for a in range(n_tasks)]
    t["pairs"] = time.perf_counter() - t0 - t["train"] - t["assign"]
    i, j, _, nn_sim, nn_nbr = sd.merge_pairs(results, n)
    group = sd.groups(n, i, j)
    sd.kept_rows(group, "farthest-from-centroid", None, csim[:, 0])
    wall = time.perf_counter() - t0
    t["merge_keep"] = wall - t["train"] - t["assign"] - t["pairs"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    recall = float(np.mean((group[orig] >= 0) & (group[orig] == group[copies])))
    rng = np.random.default_rng(seed + 1)
    queries = np.unique(np.concatenate([rng.choice(n, 500, replace=False), rng.choice(copies, 500, replace=False)]))
    agree = brute_force_agreement(emb, i, j, nn_sim, queries)
    return {"n": n, "k": k, "wall_s": round(wall, 2), "steps_s": {a: round(b, 2) for a, b in t.items()},
            "peak_rss_gb": round(rss, 2), "rss_after_data_gb": round(rss_data, 2), "pairs": int(len(i)),
            "planted_pairs": int(len(copies)), "planted_recall": round(recall, 5),
            **{a: round(b, 5) if isinstance(b, float) else b for a, b in agree.items()}}


def run_stage_once(n: int, seed: int, out: Path) -> dict[str, object]:
    """The same data through the stage: a dataset dir with 1000-row shards, then run_stage("dedup")."""
    import shutil

    import pyarrow as pa

    from curate.engines import EngineSpec
    from curate.io.atomic import write_json
    from curate.io.layout import DatasetDir, sample_key, shard_name
    from curate.io.ledger import LEDGER_FIELDS
    from curate.io.tables import write_table
    from curate.runner import run_stage
    from curate.stages.dedup import DedupConfig
    from curate.stages.score import signal_schema

    emb, orig, copies = synth(n, seed=seed)
    root = out / f"stage-{n}"
    shutil.rmtree(root, ignore_errors=True)
    ds = DatasetDir.at(root)
    per = 1000
    for s in range(0, n, per):
        shard = shard_name(s // per)
        keys = [sample_key(shard, r) for r in range(min(per, n - s))]
        ledger = pa.table({"key": keys, "status": ["success"] * len(keys),
                           "sha256": [f"{s + r:064x}" for r in range(len(keys))]})
        full = pa.table({f.name: ledger[f.name] if f.name in ledger.column_names else pa.nulls(len(keys), f.type)
                         for f in LEDGER_FIELDS})
        write_table(ds.ledger(shard), full)
        score = {f.name: pa.nulls(len(keys), f.type) for f in signal_schema()}
        score.update(key=pa.array(keys), scored=pa.array([True] * len(keys)),
                     clip_score=pa.array(np.full(len(keys), 0.3, np.float32)),
                     emb_row=pa.array(np.arange(len(keys), dtype=np.int32)))
        write_table(ds.signals("score", shard), pa.table(score, schema=signal_schema()))
        np.save(ds.signals("score", shard, ".img_emb.npy"), emb[s:s + len(keys)])
        write_json(ds.marker("download", shard), {"shard": shard})
        write_json(ds.marker("score", shard), {"shard": shard})
    t0 = time.perf_counter()
    summary = run_stage("dedup", DedupConfig(threshold=THRESHOLD, seed=seed), str(root), EngineSpec(),
                        progress=False)
    wall = time.perf_counter() - t0
    import duckdb

    groups = duckdb.sql(f"SELECT dup_group FROM read_parquet('{root}/signals/dedup/*.parquet') ORDER BY key") \
        .fetchnumpy()["dup_group"]
    recall = float(np.mean((groups[orig] >= 0) & (groups[orig] == groups[copies])))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    shutil.rmtree(root, ignore_errors=True)
    return {"n": n, "stage_wall_s": round(wall, 2), "peak_rss_gb": round(rss, 2), "planted_recall": round(recall, 5),
            "counts": summary.counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100k,300k,1M")
    ap.add_argument("--stage-size", default="100k", help="size to run through the stage too ('' to skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-out/dedup")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: "core:N" or "stage:N", prints one JSON line
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.one:
        kind, n = a.one.split(":")
        res = run_core(int(n), a.seed) if kind == "core" else run_stage_once(int(n), a.seed, out)
        print(json.dumps(res))
        return
    rows = []
    jobs = [("core", parse_size(s)) for s in a.sizes.split(",") if s]
    if a.stage_size:
        jobs.append(("stage", parse_size(a.stage_size)))
    for kind, n in jobs:
        proc = subprocess.run([sys.executable, __file__, "--one", f"{kind}:{n}", "--seed", str(a.seed),
                               "--out", str(out)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"{kind} {n} failed")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["kind"] = kind
        rows.append(res)
        print(json.dumps(res), flush=True)
    core = [r for r in rows if r["kind"] == "core"]
    print(f"\n{'N':>9} {'wall s':>7} {'RSS GB':>7} {'recall':>7} {'range rec':>9} {'range prec':>10} {'nn agree dup/all':>16}")
    for r in core:
        print(f"{r['n']:>9,} {r['wall_s']:>7.1f} {r['peak_rss_gb']:>7.2f} {r['planted_recall']:>7.4f} "
              f"{r['range_recall']:>9.4f} {r['range_precision']:>10.4f} {r['nn_agree_dup']:>8.3f}/{r['nn_agree_all']:.3f}")
    for a_, b_ in zip(core, core[1:], strict=False):
        exp = np.log(b_["wall_s"] / a_["wall_s"]) / np.log(b_["n"] / a_["n"])
        print(f"scaling exponent {a_['n']:,} -> {b_['n']:,}: {exp:.2f}")
    for r in rows:
        if r["kind"] == "stage":
            print(f"stage (curate dedup, local engine, 1 worker) N={r['n']:,}: {r['stage_wall_s']:.1f} s, "
                  f"peak RSS {r['peak_rss_gb']:.2f} GB, planted recall {r['planted_recall']:.4f}")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
