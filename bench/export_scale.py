"""Driver memory of `curate export` on a large synthetic scored dataset (not a timed test).

    .venv/bin/python bench/export_scale.py --rows 4000000 [--tars] [--workers 2] [--array 64]

Writes a synthetic dataset dir (ledger + signals/score + signals/dedup, 10,000 rows per shard, ~5%
failed rows; with --tars also a tar per shard holding a one-byte member per sample), then runs
`curate export --policy dedup --where "lang = 'en'" --top-fraction 0.3 --by clip_score` in a child
process and prints wall time and the peak RSS of the driver process and of its whole process tree.
Without --tars only the export's plan runs (the SQL selection and the per-output-shard keep lists,
everything the driver does); with --tars the whole export runs, its tasks in --workers processes. With
--array N, Slurm array indices 0 and 1 of N then run after the plan (tars written for the source shards
they read), each as its own `curate export --shard-index I --num-shards N` process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curate.io.atomic import write_json  # noqa: E402
from curate.io.layout import DatasetDir, shard_name  # noqa: E402
from curate.io.ledger import LEDGER_FIELDS  # noqa: E402
from curate.io.manifest import record_stage  # noqa: E402
from curate.io.shards import ShardWriter  # noqa: E402
from curate.io.tables import write_table  # noqa: E402

LANGS = np.array(["en", "en", "en", "de", "fr"])


def make_shard(ds: DatasetDir, index: int, n: int, tars: bool, rng: np.random.Generator) -> None:
    shard = shard_name(index)
    keys = [f"{shard}{j:05d}" for j in range(n)]  # download's key shape: shard name, then the row in it
    ok = rng.random(n) > 0.05
    status = np.where(ok, "success", "timeout")
    ledger = {f.name: pa.nulls(n, f.type) for f in LEDGER_FIELDS}
    ledger.update(key=pa.array(keys), shard=pa.array([shard] * n), row=pa.array(np.arange(n) + index * n),
                  url=pa.array([f"http://127.0.0.1/{k}.jpg" for k in keys]),
                  caption=pa.array([f"a photo of thing {k}" for k in keys]), status=pa.array(status),
                  error_code=pa.array(np.where(ok, None, "timeout"), pa.string()))
    write_table(ds.ledger(shard), pa.table(ledger, schema=pa.schema(LEDGER_FIELDS)))
    write_table(ds.signals("score", shard), pa.table({
        "key": keys, "scored": ok, "clip_score": pa.array(np.where(ok, rng.random(n) * 0.4, np.nan), pa.float32()),
        "lang": pa.array(LANGS[rng.integers(0, len(LANGS), n)]), "caption_words": pa.array(np.full(n, 5), pa.int32()),
        "aspect_ratio": pa.array(rng.random(n) + 1, pa.float32())}))
    write_table(ds.signals("dedup", shard), pa.table({
        "key": keys, "is_duplicate": rng.random(n) < 0.1, "eval_contaminated": rng.random(n) < 0.001}))
    for stage in ("download", "score", "dedup"):
        write_json(ds.marker(stage, shard), {"shard": shard, "stats": {}})
    if tars:
        with ShardWriter(ds.shard_tar(shard)) as w:
            for k, good in zip(keys, ok, strict=True):
                if good:
                    w.write_raw(k, {"jpg": b"\xff"})


def make_dataset(root: Path, rows: int, per_shard: int, tars: bool) -> DatasetDir:
    ds = DatasetDir.at(root)
    rng = np.random.default_rng(0)
    for i, start in enumerate(range(0, rows, per_shard)):
        make_shard(ds, i, min(per_shard, rows - start), tars, rng)
    for stage in ("download", "score", "dedup"):
        record_stage(ds, stage, config={"synthetic": True}, fingerprint=f"bench-{stage}")
    return ds


def measure(argv: list[str]) -> tuple[float, int, int, int]:
    """(seconds, peak RSS of the driver, peak RSS of the process tree, return code)."""
    t0 = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    peak_main = peak_tree = 0
    while proc.poll() is None:
        try:
            main_rss = root.memory_info().rss
            tree = main_rss + sum(p.memory_info().rss for p in root.children(recursive=True))
        except psutil.Error:
            continue
        peak_main, peak_tree = max(peak_main, main_rss), max(peak_tree, tree)
        time.sleep(0.05)
    if proc.returncode:
        print(proc.stderr.read().decode(errors="replace")[-3000:], file=sys.stderr)
    return time.time() - t0, peak_main, peak_tree, proc.returncode


PLAN_ONLY = """
import sys
from curate.io.layout import DatasetDir
from curate.stages.export import STAGE, ExportConfig
cfg = ExportConfig(source=sys.argv[1], policy=("dedup",), where=("lang = 'en'",), top_fraction=0.3, by="clip_score")
tasks = STAGE.plan(cfg, DatasetDir.at(sys.argv[2]))
print(len(tasks))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4_000_000)
    ap.add_argument("--per-shard", type=int, default=10_000)
    ap.add_argument("--tars", action="store_true", help="also write tars and run the whole export")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--array", type=int, default=0,
                    help="also run Slurm array indices 0 and 1 of this many (--shard-index/--num-shards), after the plan")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="curate-bench-export-"))
    src, out = work / "src", work / "out"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    if not (src / "manifest.json").exists():
        make_dataset(src, args.rows, args.per_shard, args.tars)
    print(f"synthetic dataset: {args.rows:,} rows in {-(-args.rows // args.per_shard)} shards, "
          f"{time.time() - t0:.1f}s -> {src}")
    export = [sys.executable, "-m", "curate.cli", "export", str(src), "--out", str(out), "--policy", "dedup",
              "--where", "lang = 'en'", "--top-fraction", "0.3", "--by", "clip_score", "--workers", str(args.workers)]
    if args.tars:
        runs = [(export, f"curate export (plan + tasks, --workers {args.workers})")]
    else:
        runs = [([sys.executable, "-c", PLAN_ONLY, str(src), str(out)], "curate export plan (selection + keep lists)")]
    for argv, what in runs:
        report(what, measure(argv), out)
    if args.array:
        # Slurm array indices 0 and 1 of --array: each plans (finds the selection written above, as an index
        # started after the first one does) and writes only its output shards; the tars of the source shards
        # those read are written first (a tar per shard for every row would be 10 GB at 10M rows)
        write_tars_for(DatasetDir.at(src), out, args.array, (0, 1))
        for i in (0, 1):
            report(f"curate export --shard-index {i} --num-shards {args.array} (--workers {args.workers})",
                   measure([*export, "--shard-index", str(i), "--num-shards", str(args.array)]), out)


def report(what: str, measured: tuple[float, int, int, int], out: Path) -> None:
    secs, main_rss, tree_rss, rc = measured
    sel = json.loads((out / "_work" / "export" / "selection.json").read_text()) if rc == 0 else {}
    print(f"{what}: {secs:.1f}s, rc {rc}, kept {sel.get('kept')} of {sel.get('input')} in {sel.get('shards')} "
          f"shard(s); driver peak RSS {main_rss / 2**20:.0f} MiB, process tree peak RSS {tree_rss / 2**20:.0f} MiB",
          flush=True)


def write_tars_for(src: DatasetDir, out: Path, num_shards: int, indices: tuple[int, ...]) -> None:
    """Tars (a one-byte image per successful row) of the source shards the output shards of array `indices`
    read, from the written selection's keep lists."""
    import pyarrow.parquet as pq

    from curate.stages.export import read_keep_list

    sel = json.loads((out / "_work" / "export" / "selection.json").read_text())
    folder = out / "_work" / "export" / sel["folder"]
    need = set()
    for i in range(sel["shards"]):
        if i % num_shards in indices:
            need |= set(read_keep_list(folder, i)["source_shard"].to_pylist())
    for shard in sorted(need):
        t = pq.read_table(src.ledger(shard), columns=["key", "status"])
        with ShardWriter(src.shard_tar(shard)) as w:
            for k, status in zip(t["key"].to_pylist(), t["status"].to_pylist(), strict=True):
                if status == "success":
                    w.write_raw(k, {"jpg": b"\xff"})
    print(f"tars written for {len(need)} source shard(s)", flush=True)


if __name__ == "__main__":
    main()
