"""Benchmark dedup: synthetic 512-d unit vectors with planted near copies, through the numeric core and the stage.

    python bench/dedup.py [--sizes 100k,300k,1M] [--stage-size 1M] [--device cpu|cuda|auto] [--out bench-out/dedup]
    python bench/dedup.py --device cuda --sizes 10M --stage-size ''        # the GPU check (one H100/H200)
    python bench/dedup.py --sizes '' --stage-size 1M --heavy 100k --stage-workers 2   # heavy-tail mode

Core (one process per size, bench/dedup_arrays.py: the stage's numeric core on arrays in memory): wall time
per phase (train, assign, pairs, decide), k, peak RSS, recall of the planted pairs (both ends found as a near
pair), planted pairs left with both ends kept, and for <= 4M rows agreement with an exact brute-force range
search for 1000 sampled queries.
With --device cuda the data are generated on the GPU (torch, float16) and everything runs there.

Stage (`--stage-size`): a generator process writes a scored dataset dir (score tables + float16 embedding
files, 10,000-row shards, as `curate score` writes them), then `curate dedup`'s stage runs in another process:
wall time per phase (from the task markers), peak RSS of the stage process and of its largest worker, and the
planted-pair recall read back from the pair tasks' edge files.

Heavy-tail mode (`--heavy H`): bench/heavy_tail.py writes --stage-size rows with one group of H identical rows
(one sha256, one embedding), a Zipf spread of smaller groups (30% of the rows grouped, 30% of each group's
members near copies) and Zipf topic popularity; the stage runs on it and on the same size without the heavy
group: wall time, peak RSS of the driver and of the largest worker, for each. Then a --check-size dataset
(heavy group a tenth of it) goes through the stage and its decisions are compared, row by row, with a
brute-force run of the keep rule (bench/heavy_tail.py brute_force).

The data imitate CLIP image embeddings: all vectors lie in a cone around one direction (mean pairwise cosine
~0.2), grouped in topics (cosine ~0.56 within a topic); 10% of the rows are copies of another row at cosine
0.96-0.995 (re-encoded/resized images).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/heavy_tail.py, bench/dedup_arrays.py

THRESHOLD = 0.95
D = 512


def parse_size(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "km" else s) * mult)


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def plan_copies(n: int, seed: int, dup_share: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(original row, copy row, cosine) of the planted copies: the copies are spread over all rows."""
    rng = np.random.default_rng(seed + 1)
    n_copy = int(n * dup_share)
    copies = np.sort(rng.choice(n, size=n_copy, replace=False))
    is_copy = np.zeros(n, bool)
    is_copy[copies] = True
    base = np.flatnonzero(~is_copy)
    orig = base[rng.integers(len(base), size=n_copy)]
    return orig, copies, rng.uniform(0.96, 0.995, n_copy).astype(np.float32)


def synth_block(start: int, m: int, seed: int, topics: int, block: int = 10_000) -> np.ndarray:
    """Base rows [start, start + m) as float32, each block of rows from its own seeded generator, so any row
    range can be regenerated without the others."""
    g0 = np.random.default_rng([seed, 0])
    mean = unit(g0.standard_normal(D))
    centers = unit(0.6 * mean + 0.8 * unit(g0.standard_normal((topics, D)))).astype(np.float32)
    out = np.empty((m, D), np.float32)
    for b in range(start // block, (start + m - 1) // block + 1):
        g = np.random.default_rng([seed, 1, b])
        t = g.integers(topics, size=block)
        z = g.standard_normal((block, D), dtype=np.float32) / np.sqrt(D)
        lo, hi = max(start, b * block), min(start + m, (b + 1) * block)
        sl = slice(lo - b * block, hi - b * block)
        out[lo - start:hi - start] = unit(0.75 * centers[t[sl]] + 0.66 * z[sl])
    return out


def copy_of(x: np.ndarray, cos: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    z = rng.standard_normal(x.shape, dtype=np.float32)
    z = unit(z - np.sum(z * x, axis=1, keepdims=True) * x)  # orthogonal to x: the cosine is exactly `cos`
    return cos[:, None] * x + np.sqrt(1 - cos[:, None] ** 2) * z


def synth(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float16 embeddings (n, D), original row of each planted copy, the copy rows) in memory (numpy)."""
    topics = max(1, n // 1000)
    emb = np.empty((n, D), np.float16)
    for s in range(0, n, 100_000):
        emb[s:s + 100_000] = synth_block(s, min(100_000, n - s), seed, topics)
    orig, copies, cos = plan_copies(n, seed)
    rng = np.random.default_rng(seed + 2)
    for s in range(0, len(copies), 100_000):
        o, c = orig[s:s + 100_000], copies[s:s + 100_000]
        emb[c] = copy_of(emb[o].astype(np.float32), cos[s:s + 100_000], rng)
    return emb, orig, copies


def synth_torch(n: int, seed: int, device: str) -> tuple[object, np.ndarray, np.ndarray]:
    """The same kind of data generated on `device` with torch (float16; 10M x 512 in seconds on a GPU)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    topics = max(1, n // 1000)
    mean = torch.nn.functional.normalize(torch.randn(D, generator=g, device=device), dim=0)
    centers = torch.nn.functional.normalize(
        0.6 * mean + 0.8 * torch.nn.functional.normalize(torch.randn(topics, D, generator=g, device=device), dim=1), dim=1)
    emb = torch.empty((n, D), dtype=torch.float16, device=device)
    step = 1_000_000
    for s in range(0, n, step):
        m = min(step, n - s)
        t = torch.randint(topics, (m,), generator=g, device=device)
        z = torch.randn(m, D, generator=g, device=device) / D**0.5
        emb[s:s + m] = torch.nn.functional.normalize(0.75 * centers[t] + 0.66 * z, dim=1).half()
    orig, copies, cos = plan_copies(n, seed)
    for s in range(0, len(copies), step):
        o = torch.from_numpy(orig[s:s + step]).to(device)
        c = torch.from_numpy(cos[s:s + step]).to(device)[:, None]
        x = torch.nn.functional.normalize(emb[o].float(), dim=1)
        z = torch.randn(x.shape, generator=g, device=device)
        z = torch.nn.functional.normalize(z - (z * x).sum(1, keepdim=True) * x, dim=1)
        emb[torch.from_numpy(copies[s:s + step]).to(device)] = (c * x + (1 - c**2).sqrt() * z).half()
    return emb, orig, copies


def brute_force_agreement(emb, i: np.ndarray, j: np.ndarray, nn_sim: np.ndarray, queries: np.ndarray,
                          chunk: int = 65536) -> dict[str, float]:
    """Exact range search (all rows) for `queries`: recall/precision of the found pairs and nn_similarity."""
    torch_emb = type(emb).__module__.startswith("torch")
    if torch_emb:
        import torch

        q = emb[torch.from_numpy(queries).to(emb.device)].float()
    else:
        q = emb[queries].astype(np.float32)
    exact_nn = np.full(len(queries), -np.inf, np.float32)
    truth: set[tuple[int, int]] = set()
    for s in range(0, len(emb), chunk):
        sims = (q @ emb[s:s + chunk].float().T).cpu().numpy() if torch_emb else q @ emb[s:s + chunk].astype(np.float32).T
        own = (queries >= s) & (queries < s + sims.shape[1])
        sims[np.flatnonzero(own), queries[own] - s] = -np.inf  # a row is not its own neighbour
        np.maximum(exact_nn, sims.max(axis=1), out=exact_nn)
        a, b = np.nonzero(sims >= THRESHOLD)
        truth.update(zip(queries[a].tolist(), (b + s).tolist(), strict=True))
    qset = set(queries.tolist())
    found = set()
    sel = np.isin(i, queries) | np.isin(j, queries)
    for a, b in zip(i[sel].tolist(), j[sel].tolist(), strict=True):
        if a in qset:
            found.add((a, b))
        if b in qset:
            found.add((b, a))
    hit = len(truth & found)
    same = np.abs(exact_nn - nn_sim[queries]) < 1e-4
    dup = exact_nn >= THRESHOLD
    return {"queries": len(queries), "true_pairs": len(truth), "range_recall": hit / max(1, len(truth)),
            "range_precision": hit / max(1, len(found)), "nn_agree_dup": float(np.mean(same[dup]))}


def planted_recall(n: int, i: np.ndarray, j: np.ndarray, orig: np.ndarray, copies: np.ndarray) -> float:
    found = np.minimum(i, j).astype(np.int64) * n + np.maximum(i, j)
    want = np.minimum(orig, copies).astype(np.int64) * n + np.maximum(orig, copies)
    return float(np.isin(want, found).mean()) if len(want) else 1.0


def run_core(n: int, seed: int, device: str) -> dict[str, object]:
    from dedup_arrays import dedup_arrays

    from curate.stages.dedup import core as sd

    device = sd.resolve_device(device)
    t0 = time.perf_counter()
    if device == "cuda":
        emb, orig, copies = synth_torch(n, seed, device)
        import torch

        torch.cuda.synchronize()
    else:
        emb, orig, copies = synth(n, seed)
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = dedup_arrays(emb, THRESHOLD, seed=seed, keep="farthest-from-centroid", device=device)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    i, j = res.pairs
    both_kept = float(np.mean((res.kept[orig] == orig) & (res.kept[copies] == copies)))
    out = {"n": n, "device": device, "k": sd.choose_k(n), "generate_s": round(gen_s, 2), "wall_s": round(wall, 2),
           "steps_s": res.seconds, "peak_rss_gb": round(rss, 2), "pairs": res.n_pairs,
           "duplicates": int((res.kept != np.arange(n)).sum()), "planted_pairs": int(len(copies)),
           "planted_recall": round(planted_recall(n, i, j, orig, copies), 5), "planted_both_kept": round(both_kept, 5)}
    if device == "cuda":
        import torch

        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if n <= 4_000_000:
        rng = np.random.default_rng(seed + 1)
        queries = np.unique(np.concatenate([rng.choice(n, 500, replace=False), rng.choice(copies, 500, replace=False)]))
        out.update({a: round(b, 5) if isinstance(b, float) else b
                    for a, b in brute_force_agreement(emb, i, j, res.nn_sim, queries).items()})
    return out


def write_dataset(n: int, seed: int, root: Path, per: int) -> dict[str, object]:
    """A scored dataset dir as `curate score` leaves it (score tables, float16 embeddings, markers), written
    shard by shard: base rows per block, then the planted copies read back from the written files."""
    import shutil

    import pyarrow as pa

    from curate.io.atomic import write_json
    from curate.io.layout import DatasetDir, sample_key, shard_name
    from curate.io.ledger import LEDGER_FIELDS
    from curate.io.tables import write_table
    from curate.stages.score import signal_schema

    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    ds = DatasetDir.at(root)
    topics = max(1, n // 1000)
    orig, copies, cos = plan_copies(n, seed)
    for s in range(0, n, per):
        shard = shard_name(s // per)
        m = min(per, n - s)
        keys = [sample_key(shard, r) for r in range(m)]
        ledger = pa.table({"key": keys, "status": ["success"] * m, "sha256": [f"{s + r:064x}" for r in range(m)]})
        full = pa.table({f.name: ledger[f.name] if f.name in ledger.column_names else pa.nulls(m, f.type)
                         for f in LEDGER_FIELDS})
        write_table(ds.ledger(shard), full)
        score = {f.name: pa.nulls(m, f.type) for f in signal_schema()}
        score.update(key=pa.array(keys), scored=pa.array([True] * m),
                     clip_score=pa.array(np.full(m, 0.3, np.float32)), emb_row=pa.array(np.arange(m, dtype=np.int32)))
        write_table(ds.signals("score", shard), pa.table(score, schema=signal_schema()))
        np.save(ds.signals("score", shard, ".img_emb.npy"), synth_block(s, m, seed, topics).astype(np.float16))
    # copies: originals read back from the written files, grouped by the shard they are written to
    rng = np.random.default_rng(seed + 2)
    maps: dict[int, np.ndarray] = {}

    def source(i: int) -> np.ndarray:
        if i not in maps:
            maps[i] = np.load(ds.signals("score", shard_name(i), ".img_emb.npy"), mmap_mode="r")
        return maps[i]

    by_target = np.argsort(copies // per, kind="stable")
    for target in np.unique(copies // per):
        sel = by_target[np.searchsorted(copies[by_target] // per, target):np.searchsorted(copies[by_target] // per, target + 1)]
        path = ds.signals("score", shard_name(int(target)), ".img_emb.npy")
        arr = np.load(path, mmap_mode="r+")
        x = np.stack([source(int(o // per))[o % per] for o in orig[sel]]).astype(np.float32)
        arr[copies[sel] % per] = copy_of(x, cos[sel], rng).astype(np.float16)
        arr.flush()
        del arr
    for s in range(0, n, per):
        shard = shard_name(s // per)
        write_json(ds.marker("download", shard), {"shard": shard})
        write_json(ds.marker("score", shard), {"shard": shard})
    np.save(root / "planted.npy", np.stack([orig, copies]))
    return {"n": n, "generate_s": round(time.perf_counter() - t0, 2)}


def run_stage_once(n: int, seed: int, root: Path, per: int, device: str, workers: int,
                   planted: bool = True) -> dict[str, object]:
    """`curate dedup`'s stage on a dataset dir that write_dataset (or bench/heavy_tail.py) made; timings per
    phase from the markers; peak RSS of this process (the driver) and of the largest worker."""
    from curate.engines import EngineSpec
    from curate.runner import run_stage
    from curate.stages.dedup import DedupConfig

    t0 = time.time()
    summary = run_stage("dedup", DedupConfig(threshold=THRESHOLD, seed=seed, device=device, phash=False), str(root),
                        EngineSpec(workers=workers), redo=True, progress=False)
    wall = time.time() - t0
    done = root / "_done" / "dedup"
    ends = {}
    for phase, pattern in (("assign", "assign.*.json"), ("collapse", "collapse.*.json"), ("pairs", "pairs.*.json"),
                           ("resolve", "resolve.*.json"), ("decide", "decide.*.json"), ("write", "[0-9]*.json")):
        ends[phase] = max(p.stat().st_mtime for p in done.glob(pattern))
    trained = (root / "_work" / "dedup" / "centroids.npy").stat().st_mtime
    steps, prev = {"plan_train": round(trained - t0, 2)}, trained
    for phase, end in ends.items():
        steps[phase] = round(end - prev, 2)
        prev = end
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    workers_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    out = {"n": n, "stage_wall_s": round(wall, 2), "steps_s": steps, "peak_rss_gb": round(own, 2),
           "largest_worker_rss_gb": round(workers_rss, 2), "workers": workers, "counts": summary.counts,
           "ok": summary.ok}
    if planted:  # planted-pair recall from the pair tasks' candidate edges
        from curate.io.layout import row_of_key, shard_index, shard_of_key

        pl = np.load(root / "planted.npy")
        found_i, found_j = [], []
        for f in sorted((root / "_work" / "dedup" / "pairs").glob("*.edges.npy")):
            e = np.load(f)
            for col, found in (("lo_key", found_i), ("hi_key", found_j)):
                k = e[col].astype(str)
                found.append(np.array([shard_index(shard_of_key(x)) * per + row_of_key(x) for x in k], np.int64))
        out["planted_recall"] = round(planted_recall(n, np.concatenate(found_i), np.concatenate(found_j), pl[0],
                                                     pl[1]), 5)
    return out


def check_heavy(root: Path, n: int, seed: int) -> dict[str, object]:
    """The stage's decisions on a heavy-tailed dataset dir against bench/heavy_tail.py's brute-force keep rule:
    as the stage ran (default k: the pair search probes 2 clusters, so a pair split by a cluster border can be
    missed), then again with --k 1 (one cluster: the pair search is exhaustive, so every row must agree)."""
    from heavy_tail import brute_force

    from curate.engines import EngineSpec
    from curate.runner import run_stage
    from curate.stages.dedup import DedupConfig

    t0 = time.perf_counter()
    want = brute_force(root, THRESHOLD)
    out = {"n": n, "reference_dropped": len(want), "brute_force_s": round(time.perf_counter() - t0, 1),
           "default_k": _compare(root, want)}
    t0 = time.perf_counter()
    summary = run_stage("dedup", DedupConfig(threshold=THRESHOLD, seed=seed, k=1, phash=False), str(root), EngineSpec(),
                        redo=True, progress=False)
    out["one_cluster"] = {**_compare(root, want), "stage_s": round(time.perf_counter() - t0, 1),
                          "kept_beyond_pairs_per_row": summary.counts.get("kept_beyond_pairs_per_row")}
    return out


def _compare(root: Path, want: dict[str, str]) -> dict[str, int]:
    """Rows whose decision (dropped, and for which kept row) differs between the stage's tables and `want`;
    of those, how many are in the heavy group (group 0 of bench/heavy_tail.py's truth.npz) and how many the
    reference drops for a near copy (a row with its own sha256), in the heavy group or not."""
    import pyarrow.parquet as pq

    from curate.io.layout import row_of_key, shard_index, shard_of_key

    got, shard_rows = {}, 0
    for f in sorted((root / "signals" / "dedup").glob("*.parquet")):
        t = pq.read_table(f, columns=["key", "kept_key", "is_duplicate"])
        shard_rows = max(shard_rows, t.num_rows)
        for k, kk, d in zip(t["key"].to_pylist(), t["kept_key"].to_pylist(), t["is_duplicate"].to_pylist(),
                            strict=True):
            if d:
                got[k] = kk
    differ = [k for k in set(want) | set(got) if want.get(k) != got.get(k)]
    out = {"stage_dropped": len(got), "rows_differing": len(differ)}
    truth = root / "truth.npz"
    if truth.exists() and differ:
        tr = np.load(truth)

        def row(key: str) -> int:
            return shard_index(shard_of_key(key)) * shard_rows + row_of_key(key)

        heavy = [k for k in differ if tr["group"][row(k)] == 0]
        out["in_heavy_group"] = len(heavy)
        out["heavy_kept_by_near_copy"] = sum(1 for k in heavy if want.get(k) and tr["jitter"][row(want[k])] > 0)
    return out


def run_heavy(a: argparse.Namespace, out: Path) -> None:
    """Heavy-tail mode: the same size with and without the heavy group through the stage, each generated and
    run in its own processes; then decisions against the brute-force rule on a `--check-size` dataset."""
    n, heavy = parse_size(a.stage_size), parse_size(a.heavy)
    # the two stage runs alternate (--repeat times each), so a burst of other load hits both alike
    jobs = [("hgen", n, heavy), ("hgen", n, 0)] + [("hstage", n, h) for _ in range(a.repeat) for h in (heavy, 0)]
    if a.check_size:
        c = parse_size(a.check_size)
        jobs += [("hgen", c, c // 10), ("hstage", c, c // 10), ("hcheck", c, c // 10)]
    rows = []
    for i, (kind, size, h) in enumerate(jobs):
        res = _one(a, out, f"{kind}:{size}:{h}")
        res["kind"], res["heavy"] = kind, h
        rows.append(res)
        print(json.dumps(res), flush=True)
        last = (kind, size, h) not in jobs[i + 1:]
        if kind == "hstage" and last and not a.keep_data and not (a.check_size and size == parse_size(a.check_size)):
            import shutil

            shutil.rmtree(out / f"heavy-{size}-{h}", ignore_errors=True)
    (out / "heavy_results.json").write_text(json.dumps(rows, indent=2) + "\n")
    st = [r for r in rows if r["kind"] == "hstage" and r["n"] == n]
    for r in st:
        print(f"stage N={r['n']:,} heavy group {r['heavy']:,}: {r['stage_wall_s']:.1f} s (phases {r['steps_s']}), "
              f"driver peak RSS {r['peak_rss_gb']:.2f} GB, largest worker {r['largest_worker_rss_gb']:.2f} GB, "
              f"{r['counts'].get('duplicates')} duplicates, {r['counts'].get('resolve_rounds')} resolve rounds")
    best = {h: min(r["stage_wall_s"] for r in st if r["heavy"] == h) for h in (heavy, 0)}
    print(f"wall time with / without the heavy group (best of {a.repeat} each): {best[heavy]:.1f} / {best[0]:.1f} s "
          f"= {best[heavy] / best[0]:.2f}x")
    for r in rows:
        if r["kind"] == "hcheck":
            d, one = r["default_k"], r["one_cluster"]
            print(f"brute-force keep rule on {r['n']:,} rows (heavy group {r['heavy']:,}), {r['reference_dropped']} "
                  f"dropped: the stage with default k differs on {d['rows_differing']} rows ({d['stage_dropped']} "
                  f"dropped; {d.get('in_heavy_group', 0)} of them in the heavy group, "
                  f"{d.get('heavy_kept_by_near_copy', 0)} of those dropped by the reference for a near copy of the "
                  f"placeholder; a pair whose ends share no probed cluster is not found), with --k 1 (exhaustive pair "
                  f"search) on {one['rows_differing']} rows ({one['stage_dropped']} dropped, {one['stage_s']} s, "
                  f"kept_beyond_pairs_per_row {one['kept_beyond_pairs_per_row']}: rows the bound on pairs per row "
                  f"could have decided otherwise, an upper bound)")


def _one(a: argparse.Namespace, out: Path, job: str) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--one", job, "--seed", str(a.seed), "--out", str(out), "--device", a.device,
           "--stage-workers", str(a.stage_workers), "--shard-rows", str(a.shard_rows), "--gen-jobs", str(a.gen_jobs)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{job} failed")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_s"] = round(time.perf_counter() - t0, 1)
    return res


def main() -> None:
    # long: the options, the one-job-per-process dispatch (--one) and the summary table of the default mode
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100k,300k,1M", help="core sizes ('' to skip)")
    ap.add_argument("--stage-size", default="1M", help="size to run through the stage too ('' to skip)")
    ap.add_argument("--stage-workers", type=int, default=1)
    ap.add_argument("--shard-rows", type=int, default=10_000)
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-out/dedup")
    ap.add_argument("--keep-data", action="store_true", help="keep the stage's dataset dir")
    ap.add_argument("--heavy", help="heavy-tail mode: rows of the one heavy group in the --stage-size dataset "
                                    "(bench/heavy_tail.py), run against the same size without it")
    ap.add_argument("--check-size", default="100k", help="heavy-tail mode: size of the dataset whose decisions are "
                                                         "checked against the brute-force rule ('' to skip)")
    ap.add_argument("--gen-jobs", type=int, default=1, help="heavy-tail mode: processes writing the datasets")
    ap.add_argument("--repeat", type=int, default=1, help="heavy-tail mode: stage runs of each dataset, alternating")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: "core:N", "gen:N", "stage:N", "hgen:N:H"...
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.one and a.one.startswith("h"):
        from heavy_tail import generate

        kind, n_, h_ = a.one.split(":")
        n, h, root = int(n_), int(h_), out / f"heavy-{n_}-{h_}"
        res = (generate(root, n, a.shard_rows, h, seed=a.seed, jobs=a.gen_jobs) if kind == "hgen" else
               run_stage_once(n, a.seed, root, a.shard_rows, a.device, a.stage_workers, planted=False)
               if kind == "hstage" else check_heavy(root, n, a.seed))
        print(json.dumps(res), flush=True)
        return
    if a.heavy:
        run_heavy(a, out)
        return
    if a.one:
        kind, n_ = a.one.split(":")
        n, root = int(n_), out / f"stage-{n_}"
        res = (run_core(n, a.seed, a.device) if kind == "core" else
               write_dataset(n, a.seed, root, a.shard_rows) if kind == "gen" else
               run_stage_once(n, a.seed, root, a.shard_rows, a.device, a.stage_workers))
        print(json.dumps(res), flush=True)
        return
    jobs = [("core", parse_size(s)) for s in a.sizes.split(",") if s]
    if a.stage_size:
        jobs += [("gen", parse_size(a.stage_size)), ("stage", parse_size(a.stage_size))]
    rows = []
    for kind, n in jobs:
        cmd = [sys.executable, __file__, "--one", f"{kind}:{n}", "--seed", str(a.seed), "--out", str(out),
               "--device", a.device, "--stage-workers", str(a.stage_workers), "--shard-rows", str(a.shard_rows)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{kind} {n} failed")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["kind"], res["process_s"] = kind, round(time.perf_counter() - t0, 1)
        rows.append(res)
        print(json.dumps(res), flush=True)
    if a.stage_size and not a.keep_data:
        import shutil

        shutil.rmtree(out / f"stage-{parse_size(a.stage_size)}", ignore_errors=True)
    core = [r for r in rows if r["kind"] == "core"]
    if core:
        print(f"\n{'N':>11} {'device':>6} {'k':>6} {'wall s':>7} {'phases s (train/assign/pairs/decide)':>36} "
              f"{'RSS GB':>7} {'recall':>7} {'range rec/prec':>14}")
    for r in core:
        st = r["steps_s"]
        phases = "/".join(f"{st[p]:.1f}" for p in ("train", "assign", "pairs", "decide"))
        rr = f"{r['range_recall']:.4f}/{r['range_precision']:.4f}" if "range_recall" in r else "-"
        print(f"{r['n']:>11,} {r['device']:>6} {r['k']:>6} {r['wall_s']:>7.1f} {phases:>36} {r['peak_rss_gb']:>7.2f} "
              f"{r['planted_recall']:>7.4f} {rr:>14}")
    for r in rows:
        if r["kind"] == "stage":
            print(f"stage (curate dedup, local engine, {r['workers']} worker(s)) N={r['n']:,}: {r['stage_wall_s']:.1f} s "
                  f"(phases {r['steps_s']}), peak RSS stage process {r['peak_rss_gb']:.2f} GB, largest worker "
                  f"{r['largest_worker_rss_gb']:.2f} GB, planted recall {r['planted_recall']:.4f}")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
