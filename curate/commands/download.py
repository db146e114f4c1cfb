"""`curate download INPUT --out DIR`: URL list -> webdataset shards + per-row ledger (safe, resumable)."""

from __future__ import annotations

import os
import threading
from typing import Any

import click

from curate.commands.common import echo_err, engine_options, finish
from curate.io.atomic import read_json
from curate.io.layout import DatasetDir
from curate.options import Options, options_from
from curate.runner import run_stage


class _Monitor:
    """Rows/s and success rate while shards run, from the per-shard progress files the tasks write.

    Each poll (once a second) looks at no more than WINDOW shards: the first ones of this run's slice that
    were not seen finished yet (tasks start in plan order, so the running ones are among them). A shard seen
    finished is never looked at again, and the plan is read once, so the files a poll touches do not grow
    with the number of shards (on a shared filesystem, in every array task).
    """

    WINDOW = 64
    INTERVAL_S = 1.0

    def __init__(self, ds: Any, enabled: bool, part: tuple[int, int] = (0, 1)):
        self.ds = ds
        self.enabled = enabled
        self.part = part
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._bar = None
        self._sizes: dict[str, int] | None = None
        self._todo: list[str] = []  # this slice's shards not seen finished, in plan order
        self._finished = [0, 0]  # rows, successes of the shards seen finished

    def __enter__(self) -> _Monitor:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join(timeout=5)
        if self._bar is not None:
            self._poll()
            self._bar.close()

    def _plan(self) -> bool:
        from curate.stages.download import plan_path

        if self._sizes is not None:
            return True
        try:
            sizes = read_json(plan_path(self.ds))["shards"]
        except (OSError, ValueError, KeyError):
            return False
        i, n = self.part
        self._sizes = {s: sizes[s] for s in sorted(sizes)[i::n]}
        self._todo = list(self._sizes)
        return True

    def _poll(self) -> None:
        from curate.stages.download import progress_path

        if not self._plan():
            return
        running = [0, 0]
        still: list[str] = []
        for shard in self._todo[:self.WINDOW]:
            final = self.ds.marker("download", shard).exists()
            try:
                st = read_json(self.ds.stats("download", shard) if final else progress_path(self.ds, shard))
            except (OSError, ValueError):
                still.append(shard)
                continue
            d, ok = int(st.get("rows", st.get("done", 0))), int(st.get("success", 0))
            acc = self._finished if final else running
            acc[0], acc[1] = acc[0] + d, acc[1] + ok
            if not final:
                still.append(shard)
        self._todo = still + self._todo[self.WINDOW:]
        done, success = self._finished[0] + running[0], self._finished[1] + running[1]
        if self._bar is None:
            import sys

            from tqdm import tqdm

            self._bar = tqdm(total=sum(self._sizes.values()), initial=done, desc="download", unit="img",
                             file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        else:
            self._bar.update(max(0, done - self._bar.n))
        self._bar.set_postfix({"ok": f"{success / done:.1%}" if done else "-"}, refresh=False)

    def _loop(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            try:
                self._poll()
            except Exception:  # noqa: BLE001 - progress display must never break the run
                pass


@options_from("curate.stages.download:DownloadConfig", "download", after="preset")
@click.argument("input_path", metavar="INPUT")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output dataset directory.")
@click.option("--preset", type=click.Choice(["laion", "cc3m", "cc12m", "datacomp"]), default=None,
              help="Column names of a known URL list (explicit --url-col etc. win).")
@click.option("--plan-only", is_flag=True,
              help="Read the list and write the plan (input slices, duplicates), then stop: run this once "
                   "before a Slurm array, whose tasks never plan.")
@click.option("--redo-shard", "redo_shards", multiple=True, metavar="SHARD",
              help="Download this shard again (its 8-digit id), keeping every other shard; repeatable. Later "
                   "stages then recompute exactly the shards that changed.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@engine_options(array=True)
def command(input_path: str, out: str, preset: str | None, plan_only: bool, progress: bool, options: Options,
            engine_spec: Any, redo: bool, redo_shards: tuple[str, ...]) -> None:
    """Download the images of the URL list INPUT into OUT (resumable per shard)."""
    from curate.io.inputs import PRESETS  # pyarrow: imported when the command runs, not for --help

    if "://" not in input_path:
        input_path = os.path.abspath(input_path)  # tasks may run in other processes or machines
    # a preset names the input's columns; a flag the user gave wins over it
    p = PRESETS.get(preset) if preset else None
    from_preset = {f: getattr(p, f) for f in ("input_format", "url_col", "caption_col", "keep_cols", "header")
                   if p is not None and f not in options.explicit}
    cfg = options.build(input=input_path, **from_preset)
    if cfg.allow_private:
        echo_err("curate download: WARNING --allow-private: the address guard is off; URLs may reach "
                 "loopback, private and link-local addresses (cloud metadata included)")
    ds = DatasetDir.at(out)
    with _Monitor(ds, progress and not plan_only, (engine_spec.shard_index, engine_spec.num_shards)):
        summary = run_stage("download", cfg, out, engine_spec, redo=redo, progress=False, plan_only=plan_only,
                            redo_tasks=redo_shards)
    if plan_only:
        from curate.stages.download import load_plan

        info = load_plan(ds) or {}
        echo_err(f"download: planned {info.get('rows', 0):,} rows in {summary.shards_total:,} shard(s) "
                 f"({info.get('duplicates', 0):,} repeated URLs), {summary.seconds:.1f}s -> {ds.root}")
        return
    c = summary.counts
    rows, ok = c.get("rows", 0), c.get("success", 0)
    lines = [f"  rows {rows:,}, success {ok:,} ({ok / rows:.1%})" if rows else "  rows 0",
             f"  {ok / summary.seconds:.1f} images/s this run" if summary.seconds > 0 and summary.shards_done else ""]
    for st, n in sorted((c.get("status") or {}).items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {st:<22} {n:>9,}")
    if c.get("superseded"):
        lines.append(f"  ({c['superseded']:,} earlier rows superseded by --retry-failed)")
    finish(summary, [ln for ln in lines if ln])
