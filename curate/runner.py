"""Run one stage over a dataset directory: fingerprint check, skip done shards, engine, retries, manifest.

This is the only place that knows the resume rules, so every stage resumes the same way:
a shard is done when its marker exists (markers are written last, after an atomic rename of every
output); a rerun skips done shards; another config fingerprint is refused unless `redo`.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from curate.config import fingerprint, to_dict
from curate.engines import EngineSpec, make_engine
from curate.io import manifest
from curate.io.atomic import clean_tmp
from curate.io.layout import DatasetDir
from curate.progress import Progress
from curate.stages import get_stage

log = logging.getLogger("curate")


@dataclass
class StageSummary:
    stage: str
    root: str
    fingerprint: str
    shards_total: int = 0
    shards_skipped: int = 0
    shards_done: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def discard_stage_outputs(ds: DatasetDir, stage: str) -> None:
    for sub in (ds.root / "_done" / stage, ds.root / "stats" / stage, ds.root / "signals" / stage):
        shutil.rmtree(sub, ignore_errors=True)


def run_stage(
    stage_name: str,
    cfg: Any,
    root: str,
    engine: EngineSpec = EngineSpec(),
    *,
    redo: bool = False,
    max_attempts: int = 3,
    fingerprint_extra: dict[str, Any] | None = None,
    progress: bool = True,
) -> StageSummary:
    stage = get_stage(stage_name)
    ds = DatasetDir.at(root)
    ds.root.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cfg, fingerprint_extra)
    if manifest.check_fingerprint(ds, stage_name, fp, redo):
        discard = getattr(stage, "discard_outputs", None)
        discard(cfg, ds) if discard else discard_stage_outputs(ds, stage_name)
    clean_tmp(ds.root)
    t0 = time.time()
    # a stage may run several task phases in order (dedup: assign, pairs, decide, write); each phase is
    # planned after the previous one completed, and its tasks go through the same engine/marker path
    phases = getattr(stage, "phases", None)
    phase_names: list[str | None] = list(phases(cfg, ds)) if phases else [None]
    summary = StageSummary(stage_name, str(ds.root), fp)
    config = to_dict(cfg)
    eng = make_engine(engine)
    for i, phase in enumerate(phase_names):
        tasks = stage.plan(cfg, ds) if phase is None else stage.plan_phase(cfg, ds, phase)
        done = set(ds.done_shards(stage_name))
        todo = [t for t in tasks if t["shard"] not in done]
        summary.shards_total += len(tasks)
        summary.shards_skipped += len(tasks) - len(todo)
        if i == 0:
            # record the run as started before any shard: a crash leaves a manifest that a resume can check
            manifest.record_stage(ds, stage_name, config=config, fingerprint=fp,
                                  inputs=_inputs(stage, cfg), status="running")
        label = stage_name if phase is None else f"{stage_name} {phase}"
        bar = Progress(label, total=len(tasks), initial=len(tasks) - len(todo), unit="shard", enabled=progress)
        _run_tasks(eng, (stage_name, config, str(ds.root)), todo, summary, bar, max_attempts)
        bar.close()
        if summary.failed:
            break  # a later phase reads this phase's outputs
    summary.seconds = time.time() - t0
    finalize = getattr(stage, "finalize", None)
    summary.counts = finalize(cfg, ds) if finalize else _sum_stats(ds, stage_name)
    manifest.record_stage(
        ds, stage_name, config=config, fingerprint=fp, inputs=_inputs(stage, cfg), counts=summary.counts,
        status="complete" if summary.ok else "incomplete",
        extra={"shards": {"total": summary.shards_total, "failed": sorted(summary.failed)}},
    )
    return summary


def _run_tasks(eng: Any, head: tuple[str, dict[str, Any], str], todo: list[dict[str, Any]],
               summary: StageSummary, bar: Progress, max_attempts: int) -> None:
    """Run `todo` on the engine, retrying failed tasks up to `max_attempts`; results go into `summary`."""
    attempts: Counter[str] = Counter()
    while todo:
        payloads = [(*head, t) for t in todo]
        for t in todo:
            attempts[t["shard"]] += 1
        results = eng.run(payloads, lambda r: bar.update(1) if r["ok"] else None)
        retry = []
        for t, r in zip(todo, results, strict=True):
            if r["ok"]:
                summary.shards_done += 1
                summary.failed.pop(t["shard"], None)
            else:
                summary.failed[t["shard"]] = r["error"]
                log.warning("shard %s failed (attempt %d/%d): %s", t["shard"], attempts[t["shard"]],
                            max_attempts, (r["error"] or "").splitlines()[0])
                if attempts[t["shard"]] < max_attempts:
                    retry.append(t)
        todo = retry


def _inputs(stage: Any, cfg: Any) -> dict[str, Any]:
    fn = getattr(stage, "inputs", None)
    return fn(cfg) if fn else {}


def _sum_stats(ds: DatasetDir, stage_name: str) -> dict[str, Any]:
    """Add up the numeric and dict-of-count fields of every done shard's stats."""
    from curate.io.atomic import read_json

    total: dict[str, Any] = {}
    for shard in ds.done_shards(stage_name):
        p = ds.stats(stage_name, shard)
        if not p.exists():
            continue
        for k, v in read_json(p).items():
            if isinstance(v, bool):
                continue
            if isinstance(v, (int, float)):
                total[k] = total.get(k, 0) + v
            elif isinstance(v, dict):
                sub = total.setdefault(k, {})
                for kk, vv in v.items():
                    if isinstance(vv, (int, float)) and not isinstance(vv, bool):
                        sub[kk] = sub.get(kk, 0) + vv
    return total
