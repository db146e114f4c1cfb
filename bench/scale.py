"""Scale benchmark: wall time and peak memory of `curate download`, `dedup` and `export` at large row counts.

    python bench/scale.py --stage download --rows 1M,10M [--workers 2] [--out bench-out/scale]
    python bench/scale.py --stage dedup --rows 1M          (needs the dedup stage; builds the dataset first)
    python bench/scale.py --stage export --rows 4M [--policy laion --top-fraction 0.5]
    python bench/scale.py --stage index --rows 3M [--dataset DIR] -- --memory-budget 512M

download: a synthetic URL list (parquet; 1% of rows repeat an earlier URL) whose every address is in
10.0.0.0/8, so the address guard refuses each row *before* any connection: the run exercises the
plan, the duplicate search, every task and the ledgers, and no packet leaves the machine. A preflight
runs 2,000 such rows in-process under a Python audit hook and stops if any socket connect happens.
dedup/export: a synthetic scored dataset in the real layout (bench/synth_scored.py: N x 512 float16
unit embeddings with 10% planted near copies, ledgers, score tables; tars for export), then the stage.

Each stage runs as its own `curate` process; a sampler reads every process of its tree every 0.2 s
(psutil) and reports the peak RSS of the driver, of the largest single process, and of the tree as a
whole (the sum at one instant). Heavy: run it under `flock /tmp/curate-heavy.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from synth_scored import generate, parse_count  # noqa: E402


def _url(i: int) -> str:
    return f"http://10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}/img/{i}.jpg"


def write_url_list(path: Path, rows: int, dup_every: int = 100, chunk: int = 1_000_000) -> None:
    """`rows` URLs in 10.0.0.0/8 (refused by the guard), every `dup_every`-th repeating an earlier one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("url", pa.string()), ("caption", pa.string())])
    with pq.ParquetWriter(str(path), schema) as w:
        for lo in range(0, rows, chunk):
            idx = range(lo, min(rows, lo + chunk))
            # every dup_every-th row repeats the URL of the row half-way back
            urls = [_url(i // 2 if i and i % dup_every == 0 else i) for i in idx]
            caps = [f"synthetic caption {i}" for i in idx]
            w.write_table(pa.table({"url": urls, "caption": caps}, schema=schema))


def check_no_connect(work: Path) -> dict[str, int]:
    """Run 2,000 refused rows in this process with an audit hook: no socket may connect anywhere."""
    from curate.cli import main

    seen = {"connect": 0, "getaddrinfo": 0}

    def hook(event: str, args: tuple) -> None:
        if event == "socket.connect":
            seen["connect"] += 1
        elif event == "socket.getaddrinfo":
            seen["getaddrinfo"] += 1

    lst = work / "preflight.parquet"
    write_url_list(lst, 2_000)
    out = work / "preflight"
    shutil.rmtree(out, ignore_errors=True)
    sys.addaudithook(hook)
    rc = main(["download", str(lst), "--out", str(out), "--no-progress", "--samples-per-shard", "500",
               "--caption-col", "caption"])
    if rc != 0 or seen["connect"]:
        raise SystemExit(f"preflight failed: exit {rc}, {seen['connect']} socket connect(s) -- not running the bench")
    shutil.rmtree(out, ignore_errors=True)
    return seen


def run_measured(argv: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run `argv`; return wall seconds and peak RSS (MB) of the driver, the largest process and the tree."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak = {"driver": 0, "largest": 0, "tree": 0}
    stop = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            rss = []
            for p in procs:
                try:
                    rss.append((p.pid, p.memory_info().rss))
                except psutil.Error:
                    continue
            if rss:
                peak["driver"] = max(peak["driver"], next((r for pid, r in rss if pid == proc.pid), 0))
                peak["largest"] = max(peak["largest"], max(r for _, r in rss))
                peak["tree"] = max(peak["tree"], sum(r for _, r in rss))
            stop.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    output = proc.communicate()[0]
    stop.set()
    th.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(output[-4000:], file=sys.stderr)
        raise SystemExit(f"{' '.join(argv[:4])} ... exited {proc.returncode}")
    tail = [ln for ln in output.splitlines() if ln.strip()][-12:]
    return {"wall_s": round(wall, 1), "driver_peak_mb": round(peak["driver"] / 2**20),
            "largest_peak_mb": round(peak["largest"] / 2**20), "tree_peak_mb": round(peak["tree"] / 2**20),
            "output_tail": tail}


def curate_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "curate.cli", *args]


def bench_download(rows: int, work: Path, a: argparse.Namespace) -> dict[str, object]:
    lst = work / f"urls-{rows}.parquet"
    if not lst.exists():
        t0 = time.time()
        write_url_list(lst, rows)
        print(f"  wrote {lst} ({rows:,} rows) in {time.time() - t0:.0f}s", file=sys.stderr)
    out = work / f"download-{rows}"
    shutil.rmtree(out, ignore_errors=True)
    argv = curate_argv("download", str(lst), "--out", str(out), "--caption-col", "caption", "--no-progress",
                       "--samples-per-shard", str(a.samples_per_shard), "--workers", str(a.workers),
                       "--threads", str(a.threads))
    plan = {}
    if a.split_plan:
        # the plan alone first (read the list, slices, duplicate search), then the run that reuses it
        plan = run_measured([*argv, "--plan-only"])
    res = run_measured(argv)
    man = json.loads((out / "manifest.json").read_text())["stages"]["download"]
    res.update(rows=rows, counts=man["counts"].get("status"), status=man["status"], command=" ".join(argv[1:]))
    if plan:
        res.update(plan_wall_s=plan["wall_s"], plan_driver_peak_mb=plan["driver_peak_mb"],
                   driver_peak_mb=max(plan["driver_peak_mb"], res["driver_peak_mb"]),
                   largest_peak_mb=max(plan["largest_peak_mb"], res["largest_peak_mb"]),
                   tree_peak_mb=max(plan["tree_peak_mb"], res["tree_peak_mb"]),
                   wall_s=round(plan["wall_s"] + res["wall_s"], 1), run_wall_s=res["wall_s"])
    if not a.keep:
        shutil.rmtree(out, ignore_errors=True)
    return res


def _dataset(rows: int, work: Path, tars: bool) -> Path:
    root = work / f"scored-{rows}{'-tars' if tars else ''}"
    if not (root / "planted.parquet").exists():
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.time()
        got = generate(root, rows, tars=tars)
        print(f"  generated {got['rows']:,} rows / {got['shards']:,} shards in {time.time() - t0:.0f}s",
              file=sys.stderr)
    return root


def bench_dedup(rows: int, work: Path, a: argparse.Namespace) -> dict[str, object]:
    root = _dataset(rows, work, tars=False)
    shutil.rmtree(root / "signals" / "dedup", ignore_errors=True)
    argv = curate_argv("dedup", str(root), "--redo", *a.extra)
    res = run_measured(argv)
    res.update(rows=rows, command=" ".join(argv[1:]), planted_recall=_recall(root))
    return res


def _recall(root: Path) -> float | None:
    """Share of planted (copy, original) pairs that dedup put in one group (None: no group column)."""
    import duckdb

    sig = root / "signals" / "dedup"
    if not sig.is_dir():
        return None
    con = duckdb.connect()
    cols = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{sig}/*.parquet')").fetchall()]
    group = next((c for c in ("dup_group", "group", "cluster_group") if c in cols), None)
    if group is None:
        return None
    got = con.execute(f"""
        WITH g AS (SELECT key, {group} AS g FROM read_parquet('{sig}/*.parquet'))
        SELECT avg(CASE WHEN a.g >= 0 AND a.g = b.g THEN 1.0 ELSE 0.0 END)
        FROM read_parquet('{root}/planted.parquet') p JOIN g a ON a.key = p.copy JOIN g b ON b.key = p.original
    """).fetchone()[0]
    return round(float(got), 5) if got is not None else None


def bench_index(rows: int, work: Path, a: argparse.Namespace) -> dict[str, object]:
    root = Path(a.dataset) if a.dataset else _dataset(rows, work, tars=False)
    argv = curate_argv("index", str(root), "--redo", *a.extra)
    res = run_measured(argv)
    res.update(rows=rows, command=" ".join(argv[1:]))
    return res


def bench_export(rows: int, work: Path, a: argparse.Namespace) -> dict[str, object]:
    root = _dataset(rows, work, tars=True)
    out = work / f"export-{rows}"
    shutil.rmtree(out, ignore_errors=True)
    argv = curate_argv("export", str(root), "--out", str(out), "--policy", a.policy,
                       "--top-fraction", str(a.top_fraction), "--by", "clip_score", *a.extra)
    res = run_measured(argv)
    res.update(rows=rows, command=" ".join(argv[1:]))
    if not a.keep:
        shutil.rmtree(out, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["download", "dedup", "index", "export"], default="download")
    ap.add_argument("--dataset", help="index: a scored dataset dir to index instead of a generated one")
    ap.add_argument("--rows", default="1M", help="comma-separated sizes, e.g. 1M,10M")
    ap.add_argument("--out", default="bench-out/scale")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--samples-per-shard", type=int, default=10_000)
    ap.add_argument("--policy", default="laion")
    ap.add_argument("--top-fraction", type=float, default=0.5)
    ap.add_argument("--keep", action="store_true", help="keep the output directories")
    ap.add_argument("--skip-preflight", action="store_true")
    ap.add_argument("--split-plan", action="store_true",
                    help="download: measure `--plan-only` on its own, then the run that reuses the plan")
    ap.add_argument("extra", nargs="*", help="extra arguments for the curate command (after --)")
    a = ap.parse_args()
    work = Path(a.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if a.stage == "download" and not a.skip_preflight:
        seen = check_no_connect(work)
        print(f"preflight: 2,000 refused rows, {seen['connect']} socket connects, "
              f"{seen['getaddrinfo']} getaddrinfo calls", file=sys.stderr)
    fn = {"download": bench_download, "dedup": bench_dedup, "index": bench_index, "export": bench_export}[a.stage]
    results = []
    for size in a.rows.split(","):
        rows = parse_count(size)
        print(f"{a.stage} {rows:,} rows ...", file=sys.stderr)
        res = fn(rows, work, a)
        results.append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "output_tail"}), flush=True)
    if len(results) > 1:
        r0, r1 = results[0], results[-1]
        print(f"driver peak RSS {r1['driver_peak_mb']} MB at {r1['rows']:,} rows vs {r0['driver_peak_mb']} MB at "
              f"{r0['rows']:,}: x{r1['driver_peak_mb'] / max(1, r0['driver_peak_mb']):.2f}", flush=True)


if __name__ == "__main__":
    main()
