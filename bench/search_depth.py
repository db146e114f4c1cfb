"""IVF-PQ text-like recall@10 against nprobe and rerank depth on a built index, and the end-to-end latency at
chosen settings, through the searcher itself.

    python bench/search_depth.py DIR [--probes 64,256,1024] [--depths 500,1000,2000,4000]
                                     [--settings "256,2000;256,4000;1024,4000"] [--queries 300]

DIR is `bench/search.py --keep --out DIR` (its dataset in DIR/ds, the index built). The queries are
bench/search.py's own (same seed), and so is the brute force, read from DIR/gt-N-Q.npy when search.py saved it.
For each nprobe the index's best max(depths) candidates are fetched once per query batch, and each depth's
recall@10 is that of the top 10 of its first `depth` candidates by exact cosine (the searcher's rerank). Each
`nprobe,depth` of --settings is then timed one query per call through `Searcher.search` + `render.as_json`
with the text setting overridden, as bench/search.py times the tuned one.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from search import K, exact_kth, queries_of  # noqa: E402 - bench/search.py's queries and ground truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--probes", default="64,256,1024")
    ap.add_argument("--depths", default="500,1000,2000,4000")
    ap.add_argument("--settings", default="256,2000;256,4000;1024,4000", help="nprobe,depth pairs timed end to end.")
    ap.add_argument("--queries", type=int, default=300)
    args = ap.parse_args()
    import faiss

    from curate.search import render
    from curate.search.searcher import Searcher

    t0 = time.time()
    s = Searcher(Path(args.dir) / "ds")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"searcher opened in {time.time() - t0:.1f}s, peak RSS {rss:.0f} MB", flush=True)
    qs = queries_of(s, args.queries, seed=12345)
    cached = Path(args.dir) / f"gt-{len(s.keys)}-{args.queries}.npy"
    if cached.exists():
        gs = np.load(cached)
    else:
        t0 = time.time()
        gs = exact_kth(s, np.concatenate(list(qs.values())), K)
        np.save(cached, gs)
        print(f"brute force {time.time() - t0:.1f}s", flush=True)
    kth = dict(zip(qs, np.split(gs[:, -1:], len(qs)), strict=True))["text-like"]
    q = qs["text-like"]
    index = s.indexes["image"]
    ivf = faiss.extract_index_ivf(index)
    depths = [int(d) for d in args.depths.split(",")]
    for nprobe in (int(p) for p in args.probes.split(",")):
        ivf.nprobe = nprobe
        t0 = time.time()
        _, ids = index.search(q, max(depths))
        batch_s = time.time() - t0
        row = []
        for d in depths:
            sims = np.full((len(q), d), -np.inf, np.float32)
            for i in range(len(q)):
                c = ids[i, :d]
                c = c[c >= 0]
                sims[i, :len(c)] = s.vectors_of("image", c) @ q[i]
            top = -np.sort(-sims, axis=1)[:, :K]
            row.append(f"{float(np.mean(top >= kth - 1e-4)):.3f}")
        print(f"text-like nprobe {nprobe}: recall@10 at rerank {depths}: {row} (batch search {batch_s:.1f}s)",
              flush=True)
    text = s.meta["modalities"]["image"]["search"]["text"]
    for setting in filter(None, args.settings.split(";")):
        text["nprobe"], text["refine"] = map(int, setting.split(","))
        e2e, found = [], []
        for i in range(len(q)):
            t = time.perf_counter()
            hits = s.search(q[i], K, "image", kind="text")
            render.as_json([(f"q{i}", hits)], K, "image", None)
            e2e.append((time.perf_counter() - t) * 1e3)
            found.append([h["score"] for h in hits] + [-np.inf] * (K - len(hits)))
        rec = float(np.mean(np.array(found) >= kth - 1e-4))
        p50, p95, p99 = np.percentile(e2e, [50, 95, 99])
        print(f"text-like nprobe {text['nprobe']}, rerank {text['refine']}: recall@10 {rec:.3f}, end-to-end "
              f"p50/p95/p99 {p50:.1f} / {p95:.1f} / {p99:.1f} ms", flush=True)
    s.close()
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
