"""Benchmark `curate balance`: synthetic captions over the default metadata, through the real stage.

    python bench/balance.py [--pairs 1M] [--shard-size 10000] [--workers 2] [--out bench-out/balance]

Captions are 4-14 words drawn from a Zipf law (exponent 1.1) over the 50,000 most frequent English words
plus 20% tokens outside any word list, so entry counts have a web-like head and tail. The dataset dir holds
only ledgers and download markers (balance reads nothing else). Prints the stage's wall time and pairs/s,
the SQL reduce alone (DuckDB over the match files, rerun in-process), peak RSS of the stage process tree's
largest process, and checks the cap on the result: no entry selects more than t pairs for several t.
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


def parse_size(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "km" else s) * mult)


def write_pool(root: Path, n: int, shard_size: int, seed: int = 0) -> None:
    import pyarrow as pa

    from curate.balancing import load_entries
    from curate.io.atomic import write_json
    from curate.io.layout import DatasetDir, sample_key, shard_name
    from curate.io.ledger import LEDGER_FIELDS
    from curate.io.tables import write_table

    words = np.asarray(load_entries("wordfreq:en:50000"), dtype=object)
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    p /= p.sum()
    ds = DatasetDir.at(root)
    schema = pa.schema(LEDGER_FIELDS)
    for s_i, start in enumerate(range(0, n, shard_size)):
        shard = shard_name(s_i)
        m = min(shard_size, n - start)
        lengths = rng.integers(4, 15, size=m)
        tokens = words[rng.choice(len(words), size=int(lengths.sum()), p=p)]
        junk = rng.random(len(tokens)) < 0.2
        tokens[junk] = [f"x{v:x}" for v in rng.integers(0, 1 << 30, size=int(junk.sum()))]
        caps, pos = [], 0
        for L in lengths:
            caps.append(" ".join(tokens[pos:pos + L]))
            pos += L
        rows = {"key": [sample_key(shard, j) for j in range(m)], "shard": [shard] * m,
                "row": list(range(start, start + m)), "url": [f"http://127.0.0.1/{start + j}.jpg" for j in range(m)],
                "caption": caps, "status": ["success"] * m, "attempts": [1] * m}
        cols = {f.name: pa.array(rows[f.name], f.type) if f.name in rows else pa.nulls(m, f.type) for f in LEDGER_FIELDS}
        write_table(ds.ledger(shard), pa.table(cols, schema=schema))
        write_json(ds.marker("download", shard), {"shard": shard, "stats": {"rows": m}})


def check_cap(root: Path, caps: list[int]) -> dict[str, int]:
    """The most pairs any entry selects at each cap t, recomputed from the match files with DuckDB."""
    import duckdb

    con = duckdb.connect()
    files = f"{root}/_work/balance/matches/*.parquet"
    out = {}
    for t in caps:
        row = con.execute(f"""
            SELECT MAX(c) FROM (SELECT entry, COUNT(*) AS c FROM (
                SELECT entry, ROW_NUMBER() OVER (PARTITION BY entry ORDER BY draw, key) - 1 AS pos
                FROM read_parquet('{files}') WHERE entry IS NOT NULL) WHERE pos < {t} GROUP BY entry)""").fetchone()
        out[str(t)] = int(row[0] or 0)
    con.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="1M")
    ap.add_argument("--shard-size", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="bench-out/balance")
    args = ap.parse_args()
    n = parse_size(args.pairs)
    root = Path(args.out) / f"pool-{n}"
    if not (root / "_done" / "download").exists():
        t0 = time.time()
        write_pool(root, n, args.shard_size)
        print(f"wrote {n} synthetic pairs in {time.time() - t0:.1f}s", file=sys.stderr)
    t0 = time.time()
    cmd = [sys.executable, "-m", "curate.cli", "balance", str(root), "--workers", str(args.workers),
           "--no-progress", "--redo"]
    subprocess.run(cmd, check=True)
    wall = time.time() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    from curate.io import manifest
    from curate.io.layout import DatasetDir
    from curate.stages.balance import BalanceConfig, _match_path, _run_reduce

    ds = DatasetDir.at(root)
    counts = manifest.load(ds)["stages"]["balance"]["counts"]
    files = [_match_path(ds, s) for s in ds.shards()]
    t1 = time.time()
    _run_reduce(BalanceConfig(), files, ds.work("balance") / "bench-reduced")
    reduce_s = time.time() - t1
    matches = sum(json.loads(p.read_text()).get("matches", 0) for p in (root / "stats" / "balance").glob("match.*.json"))
    result = {"pairs": n, "matches": matches, "entries_matched": counts["entries_matched"], "workers": args.workers,
              "stage_wall_s": round(wall, 1), "pairs_per_s": round(n / wall), "reduce_s": round(reduce_s, 1),
              "peak_rss_mb": round(rss_mb), "max_selected_per_entry": check_cap(root, [10, 1000, 20000]),
              "kept_at_t": {t: counts["kept_at_t"].get(t) for t in ("10", "1000", "20000")}}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
