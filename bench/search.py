"""Benchmark search as users see it: recall@10 and single-query latency for the queries users send.

    python bench/search.py [--n 1M] [--queries 300] [--rows-per-shard 10000] [--kind auto] [--reuse]

Writes a synthetic scored dataset in the real layout (bench/synth_scored.py: ledger, score table, float16
512-d CLIP-like embeddings in topics, shard by shard), builds the index with `curate index` in a child process
(training, one task per shard, merge, nprobe tuned per query kind, row store; its peak RSS is reported apart
from this process's, and that of its task workers with --workers 2 or more), then opens
`curate.search.searcher.Searcher` as `curate search` and `curate serve` do, and measures three query kinds:

    near-row   an indexed row plus noise (cosine ~0.97): an image or key query     -> the image setting
    text-like  cosine 0.3 to an indexed row, the rest random (a caption to its image) -> the text setting
    random     random unit directions (no row near them)                          -> the text setting

recall@10 is against exact brute force over every indexed vector (ties counted: a hit whose true cosine reaches
the 10th exact one is found). End-to-end latency is one query per call through `Searcher.search` (the index
with the kind's nprobe, the row lookup for the hits' caption, url and signals) and `render.as_json`, which is
`curate search --json` and the page's /api/search less the query's encoding by the model; index-only latency
is the index's own search at the same nprobe. With --where, the same for a filtered search (the clause
evaluated once into an allow-list, then applied by the index while it scans).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from synth_scored import generate, parse_count  # noqa: E402 - the project's synthetic scored dataset writer

K = 10
KINDS = {"near-row": "image", "text-like": "text", "random": "text"}  # query -> the encoder it stands for
# `curate index ARGS` in this child process, which then writes its own and its task workers' peak RSS (MB)
BUILD = ("import json, resource, sys; from curate.cli import main; rc = main(sys.argv[2:]); "
         "mb = lambda who: round(resource.getrusage(who).ru_maxrss / 1024); "
         "open(sys.argv[1], 'w').write(json.dumps({'rc': rc, 'driver': mb(resource.RUSAGE_SELF), "
         "'workers': mb(resource.RUSAGE_CHILDREN)})); sys.exit(rc)")


def build(root: Path, args: argparse.Namespace) -> dict[str, object]:
    """`curate index` on root in a child process (resumed when its plan matches; --redo when the reused
    dataset's index was built with other flags): {rc, driver, workers} peak RSS in MB."""
    out = root.parent / "build-rss.json"
    cmd = [sys.executable, "-c", BUILD, str(out), "index", str(root), "--kind", args.kind, "--memory-budget",
           args.memory_budget, "--nlist", str(args.nlist), "--workers", str(args.workers), "--no-progress",
           "--target-recall", str(args.target_recall)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    rc = subprocess.run(cmd, env=env).returncode
    if rc == 2 and args.reuse:  # another config than the reused index's: rebuilt, the data is kept
        print("index: the reused dataset's index was built with other flags; rebuilding it")
        rc = subprocess.run([*cmd, "--redo"], env=env).returncode
    assert rc == 0, f"curate index exited {rc}"
    return json.loads(out.read_text())


def queries_of(s: object, n: int, seed: int) -> dict[str, np.ndarray]:
    """{kind: query vectors}; the source rows are drawn with another seed than the index's tuning rows."""
    from curate.search.build import TEXT_LIKE_COSINE, weak_probes

    rng = np.random.default_rng(seed)
    src = rng.choice(len(s.keys), size=2 * n, replace=False)  # type: ignore[attr-defined]
    x = s.vectors_of("image", np.sort(src[:n]))  # type: ignore[attr-defined]
    noise = rng.standard_normal(x.shape).astype(np.float32)
    noise -= np.sum(noise * x, axis=1, keepdims=True) * x
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    near = 0.97 * x + np.sqrt(1 - 0.97 ** 2) * noise
    text = weak_probes(s.vectors_of("image", np.sort(src[n:])), TEXT_LIKE_COSINE, seed=seed + 100)  # type: ignore[attr-defined]
    rand = rng.standard_normal((n, x.shape[1])).astype(np.float32)
    rand /= np.linalg.norm(rand, axis=1, keepdims=True)
    return {"near-row": near.astype(np.float32), "text-like": text, "random": rand}


def exact_kth(s: object, q: np.ndarray, k: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Exact top-k cosines (descending) of each query over every indexed vector (those in `mask`), one
    shard file at a time, read whole (not memory-mapped) so this process never holds more than a shard."""
    from curate.search.build import grouped

    names, rows = s.shard_names, s.emb_rows  # type: ignore[attr-defined]
    best = np.full((len(q), k), -np.inf, np.float32)
    for code, sel in grouped(s.shard_codes):  # type: ignore[attr-defined]
        shard = names[code]
        if mask is not None:
            sel = sel[mask[sel]]
        emb = np.load(s.ds.signals(s.scorer, shard, ".img_emb.npy"))  # type: ignore[attr-defined]
        for c in range(0, len(sel), 65536):
            part = emb[rows[sel[c:c + 65536]]].astype(np.float32)
            best = np.partition(np.concatenate([best, q @ part.T], axis=1), -k, axis=1)[:, -k:]
        del emb
    return -np.sort(-best, axis=1)


def pct(ms: list[float]) -> str:
    a = np.array(ms)
    return f"{np.percentile(a, 50):.2f} / {np.percentile(a, 95):.2f} / {np.percentile(a, 99):.2f}"


def measure(s: object, qs: dict[str, np.ndarray], gt: dict[str, np.ndarray],
            filtered: bool) -> dict[str, dict[str, object]]:
    """Per query kind: recall@10 of the end-to-end hits, end-to-end and index-only latency (ms)."""
    import faiss

    from curate.search import render

    index = s.indexes["image"]  # type: ignore[attr-defined]
    out = {}
    for name, q in qs.items():
        kind = KINDS[name]
        nprobe = s.nprobe("image", kind)  # type: ignore[attr-defined]
        sel = s._selector if filtered else None  # type: ignore[attr-defined]
        params = faiss.SearchParametersIVF(nprobe=nprobe, sel=sel) if s.nlist else (  # type: ignore[attr-defined]
            faiss.SearchParameters(sel=sel) if sel is not None else None)
        e2e, idx, sims = [], [], []
        for i in range(len(q)):
            t = time.perf_counter()
            hits = s.search(q[i], K, "image", kind=kind)  # type: ignore[attr-defined]
            render.as_json([(f"q{i}", hits)], K, "image", s.where)  # type: ignore[attr-defined]
            e2e.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            index.search(q[i:i + 1], max(K, s.refine_depth("image", kind)), params=params)  # type: ignore[attr-defined]
            idx.append((time.perf_counter() - t) * 1e3)
            # the hits' true cosines, recomputed from the stored vectors (untimed; same ids as the hits)
            found = s.ann(q[i], K, "image", kind, filtered=filtered)  # type: ignore[attr-defined]
            assert [s.keys[j] for j, _ in found] == [h["key"] for h in hits]  # type: ignore[attr-defined]
            ids = np.array([j for j, _ in found], np.int64)
            row = np.full(K, -np.inf, np.float32)
            row[:len(ids)] = s.vectors_of("image", ids) @ q[i]  # type: ignore[attr-defined]
            sims.append(row)
        recall = float(np.mean(np.stack(sims) >= gt[name][:, -1:] - 1e-4))
        depth = s.refine_depth("image", kind)  # type: ignore[attr-defined]
        out[name] = {"nprobe": nprobe, "rerank": depth, "recall": round(recall, 4), "e2e_ms": pct(e2e),
                     "index_ms": pct(idx), "e2e_p95": float(np.percentile(e2e, 95))}
    return out


def row_lookup(s: object, n: int) -> dict[str, str]:
    """ms to fetch 10 random ids' hit rows: from the row store (what a search does) and by a query over the
    samples view (the fallback when the store is stale; it reads every shard's files)."""
    rng = np.random.default_rng(7)
    store, view = [], []
    for i in range(min(n, 100)):
        ids = rng.choice(len(s.keys), 10, replace=False).tolist()  # type: ignore[attr-defined]
        t = time.perf_counter()
        s.rows_by_id(ids)  # type: ignore[attr-defined]
        store.append((time.perf_counter() - t) * 1e3)
        if i < 20:
            t = time.perf_counter()
            s.rows([s.keys[j] for j in ids])  # type: ignore[attr-defined]
            view.append((time.perf_counter() - t) * 1e3)
    return {"store_ms": pct(store), "samples_view_ms": pct(view)}


def main() -> None:
    # long because it is a flat script: arguments, data, build, ground truth, timed queries, print
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="1M")
    ap.add_argument("--queries", type=int, default=300, help="Queries of each kind.")
    ap.add_argument("--rows-per-shard", type=int, default=10_000)
    ap.add_argument("--memory-budget", default="4G")
    ap.add_argument("--kind", default="auto")
    ap.add_argument("--nlist", type=int, default=0)
    ap.add_argument("--target-recall", type=float, default=0.97, help="curate index --target-recall (what tuning "
                                                                          "aims for, per query kind).")
    ap.add_argument("--workers", type=int, default=1, help="curate index --workers (1: tasks run in the driver).")
    ap.add_argument("--where", default="lang = 'en'", help="A clause for the filtered run ('' skips it).")
    ap.add_argument("--out", default="bench-out/search")
    ap.add_argument("--reuse", action="store_true", help="Reuse --out's dataset (and its index when built with "
                                                         "the same flags; else the index is rebuilt).")
    ap.add_argument("--keep", action="store_true", help="Keep the dataset dir (1M x 512: ~1.2 GB).")
    ap.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    args = ap.parse_args()
    from curate.io import manifest
    from curate.io.layout import DatasetDir
    from curate.search.searcher import Searcher

    n = parse_count(args.n)
    load0 = os.getloadavg()[0]
    root = Path(args.out) / "ds"
    # the generator records the score stage in the manifest last: a dataset without it was cut short
    if not (args.reuse and (root / "manifest.json").exists()
            and "score" in manifest.load(DatasetDir.at(root))["stages"]):
        shutil.rmtree(root, ignore_errors=True)
        for old in Path(args.out).glob("gt-*.npy"):  # ground truth of the dataset replaced here
            old.unlink()
        t0 = time.time()
        generate(root, n, args.rows_per_shard)
        print(f"data: {n:,} x 512 float16 in {n // args.rows_per_shard} shards, {time.time() - t0:.1f}s")
    t0 = time.time()
    rss = build(root, args)
    build_s = time.time() - t0
    meta = json.loads((root / "index" / "index.json").read_text())
    info = meta["modalities"]["image"]
    print(f"index: {meta['factory']} ({meta['kind']}, coarse centroids by {meta.get('coarse_training') or '-'}), "
          f"{meta['rows']:,} rows, `curate index` {build_s:.1f}s (what was not reused of: training, shard tasks, "
          f"merge, tuning, row store); peak RSS: driver {rss['driver']} MB"
          + (f", task workers {rss['workers']} MB" if args.workers > 1 else " (the tasks ran in it)"))
    for kind, t in info["search"].items():
        print(f"  tuned for {kind} queries on {t['queries']} {t['source']}: nprobe {t['nprobe']}, "
              f"recall@10 {t['recall']}; curve {t['recall_curve']}")
    size = sum((root / "index" / f).stat().st_size for f in (info["file"], "rows.arrow"))
    print(f"  index + row store on disk: {size / 1e6:.0f} MB")

    t0 = time.time()
    s = Searcher(root)
    open_s = time.time() - t0
    qs = queries_of(s, args.queries, seed=12345)
    t0 = time.time()
    cached = Path(args.out) / f"gt-{n}-{args.queries}.npy"  # the queries are seeded: kept for --reuse
    if args.reuse and cached.exists():
        gs = np.load(cached)
    else:
        gs = exact_kth(s, np.concatenate(list(qs.values())), K)
        np.save(cached, gs)
    gt = dict(zip(qs, np.split(gs, len(qs)), strict=True))
    print(f"searcher opened in {open_s:.1f}s; brute force for {3 * args.queries} queries {time.time() - t0:.1f}s")
    results = {"n": n, "factory": meta["factory"], "build_s": round(build_s, 1), "build_peak_rss_mb": rss,
               "all": measure(s, qs, gt, filtered=False), "rows": row_lookup(s, args.queries)}
    s.close()
    if args.where:
        s = Searcher(root, where=args.where)
        mask = s.allowed
        assert mask is not None
        gs = exact_kth(s, np.concatenate(list(qs.values())), K, mask)
        gtw = dict(zip(qs, np.split(gs, len(qs)), strict=True))
        results["where"] = {"clause": args.where, "share": round(float(mask.mean()), 3),
                            **measure(s, qs, gtw, filtered=True)}
        s.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["search_peak_rss_mb"] = round(rss)
    if meta.get("refine"):
        print("IVF-PQ: the index's best `rerank` candidates (tuned per query kind) reranked by exact cosine from the "
              "embedding files (end-to-end includes it; index-only does not)")
    print(f"\n{args.queries} queries of each kind, k={K}, one query per call, {os.cpu_count()} CPUs "
          f"(faiss threads {__import__('faiss').omp_get_max_threads()}); load average at start {load0:.2f}, "
          f"at the end {os.getloadavg()[0]:.2f}; {meta['rows'] // max(1, meta['nlist'] or 1):,} vectors a list")
    print(f"{'run':<22} {'query':<10} {'nprobe':>6} {'rerank':>6} {'recall@10':>9}  {'end-to-end p50/p95/p99 ms':>27}  "
          f"{'index only p50/p95/p99 ms':>27}")
    for run in ("all", "where"):
        if run not in results:
            continue
        label = "no filter" if run == "all" else f"--where {results['where']['clause']}"[:22]
        for name in qs:
            r = results[run][name]
            print(f"{label:<22} {name:<10} {r['nprobe']:>6} {r['rerank']:>6} {r['recall']:>9.4f}  {r['e2e_ms']:>27}  "
                  f"{r['index_ms']:>27}")
    r = results["rows"]
    print(f"hit rows for 10 ids, p50/p95/p99 ms: row store {r['store_ms']}; samples-view query over "
          f"{len(s.shard_names)} shards (the stale-store fallback) {r['samples_view_ms']}")
    print(f"peak RSS of this process (searcher + one shard at a time for brute force): {rss:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
