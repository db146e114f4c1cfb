"""Filesystem operations per task, from 100 to 10,000 shards: constant per task, or not.

    python bench/fs_ops.py [--shards 100,1000,10000] [--stages download,score,dedup] [--out bench-out/fs_ops]

For each size, a URL list of that many rows (one row per shard, `--samples-per-shard 1`) goes through the real
`curate download`, `curate score` (a tiny random open_clip config) and `curate dedup` (`--tasks 4`) on the local
engine with one worker, so every task runs in this process. The rows are ftp:// URLs, refused without any
network (blocked_scheme), so a download task's work is its files alone, and score and dedup get one planted
embedding per shard (written as `curate score` writes them) to have rows to compare.

Every filesystem call a task makes is counted through Python's audit hooks (open, os.listdir, os.scandir,
glob, rename, remove, mkdir, rmdir, shutil.rmtree) plus os.stat/os.lstat (not audited; wrapped here), from
the moment the engine hands the task over until it returns. A call is the task's *own* when its path names
the task (its shard or task id) or its temp folder; every other path is *shared*. Printed per stage and
size: the mean and largest count per task of all calls, shared calls and directory listings, and for the
download progress monitor the calls of one poll. Constant per task means those columns do not grow with
the number of shards. Dedup's pair tasks read a slice of every shard's bucket file (their input) and write
tasks one slice of every group's nearest-neighbour file: those inputs grow with the shards; the offsets
that locate the slices come from one gathered file per phase.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

AUDITED = {"open": "open", "os.listdir": "list", "os.scandir": "list", "glob.glob": "list", "glob.glob/2": "list",
           "os.rename": "rename", "os.remove": "remove", "os.mkdir": "mkdir", "os.rmdir": "rmdir",
           "shutil.rmtree": "rmtree"}


# the per-shard files a global dedup task reads as its input (one slice of every shard's or group's file)
INPUTS = {"pairs": ("/_work/dedup/bucket/",), "write": ("/_work/dedup/pairs/",),
          "decide": ("/_work/dedup/pairs/", "/_work/dedup/exact_edges")}


def _is_input(kind: str, path: str, root: str) -> bool:
    """A read of one of the task's input files, or a stat of a folder above them (numpy's memory maps
    resolve the path of every file they map)."""
    rel = path[len(root):]
    marks = INPUTS.get(kind, ())
    return any((m in rel and "offsets" not in Path(rel).name) or m.startswith(rel + "/") for m in marks)


class Counting:
    """Counts filesystem calls made by the thread that runs a task, attributed to that task."""

    def __init__(self, root: Path):
        self.root = str(root)
        self.task: str | None = None
        self.stage: str | None = None
        self.thread: int | None = None
        self.calls: list[tuple[str, str]] = []  # (kind, path) of the current task
        self.per_task: dict[str, list[dict[str, int]]] = defaultdict(list)
        sys.addaudithook(self._audit)
        self._stat, self._lstat = os.stat, os.lstat
        os.stat = self._wrap(self._stat, "stat")  # type: ignore[assignment]
        os.lstat = self._wrap(self._lstat, "stat")  # type: ignore[assignment]

    def _wrap(self, fn: Any, kind: str) -> Any:
        def counted(path: Any, *a: Any, **kw: Any) -> Any:
            self._note(kind, path)
            return fn(path, *a, **kw)
        return counted

    def _audit(self, event: str, args: tuple) -> None:
        kind = AUDITED.get(event)
        if kind is not None and args:
            self._note(kind, args[0])

    def _note(self, kind: str, path: Any) -> None:
        if self.task is None or threading.get_ident() != self.thread:
            return
        try:
            p = os.fsdecode(path) if not isinstance(path, int) else ""
        except TypeError:
            return
        if p.startswith(self.root):
            self.calls.append((kind, p))

    def run(self, fn: Any, stage: str, config: dict, root: str, task: dict) -> Any:
        from curate.io.layout import task_id

        self.task, self.stage, self.thread, self.calls = task_id(task), stage, threading.get_ident(), []
        try:
            return fn(stage, config, root, task)
        finally:
            tid = self.task
            kind = task.get("kind") or stage
            own_names = {tid, tid.split(".")[-1], str(task.get("source", tid))}
            inputs = [c for c in self.calls if _is_input(kind, c[1], self.root)]
            shared = [c for c in self.calls if not _is_input(kind, c[1], self.root)
                      and not any(n in Path(c[1]).name or f"/{n}/" in c[1] for n in own_names)]
            kinds = Counter(k for k, _ in self.calls)
            self.per_task[kind].append({"all": len(self.calls), "inputs": len(inputs), "shared": len(shared),
                                        "list": kinds["list"],
                                        "offsets": sum(k == "open" and "offsets" in Path(p).name
                                                       for k, p in self.calls)})
            self.task = None


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", default="100,1000,10000")
    ap.add_argument("--stages", default="download,score,dedup")
    ap.add_argument("--out", default="bench-out/fs_ops")
    args = ap.parse_args(argv)
    out = Path(args.out)
    results = []
    for n in [int(x) for x in args.shards.split(",")]:
        got = _one(n, out / f"n{n}", args.stages.split(","))
        results += got
        print(json.dumps(got), flush=True)  # each size as it finishes
    print(f"\n{'stage/task kind':<16} {'shards':>7} {'tasks':>7} {'all mean':>9} {'all max':>8} "
          f"{'inputs max':>10} {'shared max':>10} {'lists max':>9} {'offsets opened max':>18}")
    for r in results:
        print(f"{r['kind']:<16} {r['shards']:>7} {r['tasks']:>7} {r['all_mean']:>9.1f} {r['all_max']:>8} "
              f"{r['inputs_max']:>10} {r['shared_max']:>10} {r['list_max']:>9} {r['offsets_max']:>18}")
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_kind[r["kind"]].append(r)
    print()
    for kind, rs in by_kind.items():
        const = len({(r["shared_max"], r["list_max"], r["offsets_max"]) for r in rs}) == 1 and \
            max(r["all_max"] - r["inputs_max"] for r in rs) - min(r["all_max"] - r["inputs_max"] for r in rs) <= 2
        grows = " (besides its inputs, which are a slice of every shard's file)" if rs[-1]["inputs_max"] else ""
        print(f"{kind}: per-task calls {'constant' if const else 'NOT constant'}{grows} from {rs[0]['shards']} "
              f"to {rs[-1]['shards']} shards")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


def _one(n: int, work: Path, stages: list[str]) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    import curate.engines.local as local
    from curate.cli import main
    from curate.commands.download import _Monitor
    from curate.io.layout import DatasetDir

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    inp = work / "urls.parquet"
    pq.write_table(pa.table({"URL": [f"ftp://127.0.0.1/{i}.jpg" for i in range(n)],
                             "TEXT": [f"a photo of thing {i}" for i in range(n)]}), inp)
    ds_root = work / "ds"
    counting = Counting(ds_root.resolve())
    real = local.execute_task
    local.execute_task = lambda *p: counting.run(real, *p)  # type: ignore[assignment]
    out: list[dict[str, Any]] = []
    try:
        t0 = time.time()
        if "download" in stages:
            assert main(["-q", "download", str(inp), "--out", str(ds_root), "--url-col", "URL", "--caption-col", "TEXT",
                         "--samples-per-shard", "1", "--no-progress"]) == 0
            # the progress monitor's first poll: the plan (read once) and its window of shards; later polls
            # look at the window only, and skip the shards seen finished
            mon = _Monitor(DatasetDir.at(ds_root), enabled=False)
            counting.task, counting.thread, counting.calls = "monitor", threading.get_ident(), []
            mon._poll()
            counting.per_task["monitor poll"].append({"all": len(counting.calls), "shared": len(counting.calls),
                                                      "inputs": 0,
                                                      "list": sum(k == "list" for k, _ in counting.calls),
                                                      "offsets": 0})
            counting.task = None
            if mon._bar is not None:
                mon._bar.close()
        if "score" in stages or "dedup" in stages:
            _plant_scores(DatasetDir.at(ds_root), n)
        if "score" in stages:
            model = work / "tiny.json"
            model.write_text(json.dumps({
                "embed_dim": 32,
                "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 32, "patch_size": 8},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}}))
            assert main(["-q", "score", str(ds_root), "--name", "rescore", "--model", str(model), "--pretrained", "none",
                         "--loader-workers", "0", "--batch-size", "16", "--no-progress"]) == 0
        if "dedup" in stages:
            assert main(["-q", "dedup", str(ds_root), "--device", "cpu", "--tasks", "4", "--k", "8", "--no-progress"]) == 0
        print(f"{n} shards: {time.time() - t0:.0f}s", file=sys.stderr)
    finally:
        local.execute_task = real
        os.stat, os.lstat = counting._stat, counting._lstat
        counting.task = None
    for kind, rows in counting.per_task.items():
        out.append({"kind": kind, "shards": n, "tasks": len(rows),
                    "all_mean": sum(r["all"] for r in rows) / len(rows), "all_max": max(r["all"] for r in rows),
                    "inputs_max": max(r["inputs"] for r in rows), "shared_max": max(r["shared"] for r in rows),
                    "list_max": max(r["list"] for r in rows),
                    "offsets_max": max(r["offsets"] for r in rows)})
    return out


def _plant_scores(ds: Any, n: int) -> None:
    """One scored row per shard with a random unit embedding, as `curate score` writes them (the rows were
    refused by download, so their score rows are planted; dedup then has n rows to compare)."""
    import numpy as np
    import pyarrow as pa

    from curate.io.atomic import write_json
    from curate.io.tables import write_table
    from curate.stages.score import signal_schema, write_npy

    rng = np.random.default_rng(0)
    for shard in ds.done_shards("download"):
        key = f"{shard}00000"
        v = rng.standard_normal((1, 32)).astype(np.float32)
        write_npy(ds.signals("score", shard, ".img_emb.npy"), (v / np.linalg.norm(v)).astype(np.float16))
        write_table(ds.signals("score", shard), pa.Table.from_pylist(
            [{"key": key, "scored": True, "clip_score": 0.3, "emb_row": 0}], schema=signal_schema()))
        write_json(ds.marker("score", shard), {"task": shard, "stats": {"rows": 1}, "reads": {}})


if __name__ == "__main__":
    sys.exit(_main())
