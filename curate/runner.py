"""Run one stage over a dataset directory: checks, fingerprint, skip done tasks, engine, retries, manifest.

This is the only place that knows the resume rules, so every stage resumes the same way whoever calls it
(the CLI, curate.api, a pipeline YAML, bench/): the runner validates the config, computes the fingerprint from
the config and the stage's `fingerprint_inputs`, a task is done when its marker exists (markers are written
last, after an atomic rename of every output), a rerun skips done tasks, and another fingerprint is refused
unless `redo`. It also lends the stage what it needs of the engine (curate.stages.base.RunContext).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from curate import extras
from curate.config import fingerprint, to_dict
from curate.devices import cuda_count
from curate.engines import EngineSpec, make_engine
from curate.engines.session import get_session
from curate.errors import InputError
from curate.io import manifest
from curate.io.atomic import clean_tmp
from curate.io.layout import DatasetDir, task_id
from curate.io.lineage import stale_tasks
from curate.io.lock import stage_lock
from curate.machine import cores
from curate.progress import Progress
from curate.stages import get_stage
from curate.stages.base import Resources, RunContext, Stage, using

log = logging.getLogger(__name__)

# the summaries of the runs made inside collect() (what curate.api returns for a stage it ran)
_SUMMARIES: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("curate_run_summaries", default=None)


@contextlib.contextmanager
def collect() -> Iterator[list[Any]]:
    """The StageSummary of every run_stage call made inside the block, in order."""
    token = _SUMMARIES.set([])
    try:
        yield _SUMMARIES.get()  # type: ignore[misc]
    finally:
        _SUMMARIES.reset(token)


def _record(summary: StageSummary) -> StageSummary:
    got = _SUMMARIES.get()
    if got is not None:
        got.append(summary)
    return summary


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


def run_stage(
    stage_name: str,
    cfg: Any,
    root: str,
    engine: EngineSpec = EngineSpec(),
    *,
    redo: bool = False,
    max_attempts: int = 3,
    progress: bool = True,
    plan_only: bool = False,
    redo_tasks: tuple[str, ...] = (),
) -> StageSummary:
    """Plan `stage_name` on `root` and run its pending tasks on `engine`; the manifest records the outcome.

    Holds the stage's lock on the directory for the whole run (a second run exits 2). An array task
    (engine.num_shards > 1, a stage with `array_slices`) runs tasks[index::num] of the plan, holds the lock
    shared with its siblings, writes its own manifest fragment, and may not --redo. `redo_tasks` (download
    --redo-shard) runs those tasks again whatever their markers say, keeping every other task's output. A done task whose marker records upstream task runs that have
    changed since (curate.io.lineage) runs again too. Whatever ends the run (an exception, Ctrl-C,
    SIGTERM from Slurm), the manifest is left "interrupted", never "running". (Long because lock,
    fingerprint, plan and manifest must stay in this one order inside the lock; the task loop itself is
    run_tasks.)
    """
    extras.require_for(stage_name)  # a missing extra: exit 2 naming it, before any lock or file
    stage: Stage = get_stage(stage_name)
    ds = DatasetDir.at(root)
    part = engine.array_slice
    if part is not None and not stage.array_slices:
        raise InputError(f"--num-shards: stage {stage_name} does not run as a Slurm array (its tasks depend on "
                         f"each other's outputs); run it in one job, on --engine spark for a cluster")
    if (redo or redo_tasks) and part is not None:
        raise InputError(f"--redo: refused inside an array task (--shard-index {part[0]} of {part[1]}): it would "
                         f"delete its siblings' output. Run the stage once with --redo outside the array "
                         f"(download: --redo --plan-only), then the array.")
    res = stage.resources(cfg)
    engine = with_workers(engine, res, cuda_count() if res.gpus else 0)
    ctx = RunContext(engine.name, part, _session(engine), engine.workers or 1)
    with using(ctx):
        # before any lock or file: a bad config or input exits 2 here, and the fingerprint covers the inputs
        stage.validate(cfg, ds)
        fp = fingerprint(cfg, stage.fingerprint_inputs(cfg, ds))
    ds.root.mkdir(parents=True, exist_ok=True)
    key = stage.output_key(cfg)  # usually stage_name; `score --name NAME` keys by NAME
    with using(ctx), stage_lock(ds, key, part) as exclusive, _sigterm_as_exit():
        if manifest.check_fingerprint(ds, key, fp, redo):
            ds.discard(key)
            stage.discard_outputs(cfg, ds)  # files only the stage knows of (export's img2dataset-layout files)
        if exclusive:
            # the lock is ours alone: every temp file of this stage is a killed run's, whatever its age
            clean_stage_tmp(ds, key)
        t0 = time.time()
        # a stage may declare several task phases run in order (dedup: assign, pairs, decide, write); each is
        # planned once the previous one completed, and its tasks take the same engine/task/marker path
        phases = list(stage.phases(cfg, ds))
        tasks = stage.plan_phase(cfg, ds, phases[0])
        if part is not None:  # an array task runs its slice of the plan
            tasks = tasks[part[0]::part[1]]
        _forget(ds, key, tasks, redo_tasks)
        todo = _pending(stage, cfg, ds, key, tasks)
        summary = StageSummary(key, str(ds.root), fp, len(tasks), len(tasks) - len(todo))
        log.info("%s on %s: %d task(s), %d already done", key, ds.root, len(tasks), len(tasks) - len(todo))
        config = to_dict(cfg)

        def record(status: str, **kw: Any) -> None:
            manifest.record_stage(ds, key, config=config, fingerprint=fp, inputs=stage.inputs(cfg),
                                  status=status, array_slice=part, engine=engine.name, **kw)

        if plan_only:
            record("planned", extra={"shards": {"total": len(tasks), "failed": []}})
            summary.seconds = time.time() - t0
            return _record(summary)
        # record the run as started before any task: a crash leaves a manifest that a resume can check
        record("running")
        status = "interrupted"
        try:
            eng = make_engine(engine)
            for i, phase in enumerate(phases):
                if i:
                    if not summary.ok:
                        break  # a later phase reads this phase's outputs
                    tasks = stage.plan_phase(cfg, ds, phase)
                    todo = _pending(stage, cfg, ds, key, tasks)
                    summary.shards_total += len(tasks)
                    summary.shards_skipped += len(tasks) - len(todo)
                label = key if phase is None else f"{key} {phase}"
                while True:
                    bar = Progress(label, total=len(tasks), initial=len(tasks) - len(todo), unit="shard",
                                   enabled=progress)
                    run_tasks(eng, stage_name, config, ds, todo, summary, bar, max_attempts)
                    bar.close()
                    # a repeated phase (dedup's resolve rounds) is planned again until its plan has nothing left
                    if not (summary.ok and phase in stage.repeated_phases):
                        break
                    tasks = stage.plan_phase(cfg, ds, phase)
                    done = set(ds.done_tasks(key))
                    todo = [t for t in tasks if task_id(t) not in done]
                    if not todo:
                        break
                    summary.shards_total += len(tasks)
                    summary.shards_skipped += len(tasks) - len(todo)
            status = "complete" if summary.ok else "incomplete"
        finally:
            summary.seconds = time.time() - t0
            if status != "interrupted":
                summary.counts = stage.finalize(cfg, ds)
            record(status, counts=summary.counts,
                   extra={"shards": {"total": summary.shards_total, "failed": sorted(summary.failed)}})
    return _record(summary)


def _forget(ds: DatasetDir, key: str, tasks: list[dict[str, Any]], redo_tasks: tuple[str, ...]) -> None:
    """Remove the markers (and stats) of `redo_tasks`, so they run again; each must be a planned task."""
    if not redo_tasks:
        return
    planned = {task_id(t) for t in tasks}
    unknown = sorted(set(redo_tasks) - planned)
    if unknown:
        raise InputError(f"--redo-shard: {', '.join(unknown)} is not a shard of this {key} plan "
                         f"({len(planned)} planned)")
    for tid in redo_tasks:
        ds.marker(key, tid).unlink(missing_ok=True)
        ds.stats(key, tid).unlink(missing_ok=True)
    log.info("%s: %d shard(s) will run again (--redo-shard): %s", key, len(redo_tasks), ", ".join(redo_tasks))


def _pending(stage: Stage, cfg: Any, ds: DatasetDir, key: str, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The planned tasks that must run: no marker, or a marker whose upstream inputs changed since."""
    done = set(ds.done_tasks(key))
    reads = (lambda t: stage.reads(cfg, ds, t)) if stage.has_lineage else None
    stale = stale_tasks(reads, ds, key, tasks, done)
    if stale:
        first = sorted(stale)[:5]
        log.warning("%s: %d done task(s) read upstream output that changed since they ran; running them again: "
                    "%s%s", key, len(stale), ", ".join(f"{t} ({', '.join(stale[t][:2])})" for t in first),
                    " ..." if len(stale) > len(first) else "")
        done -= set(stale)
        for tid in stale:  # not done: a run that stops before it reruns them leaves them not done either
            ds.marker(key, tid).unlink(missing_ok=True)
    return [t for t in tasks if task_id(t) not in done]


def run_tasks(eng: Any, stage_name: str, config: dict[str, Any], ds: DatasetDir, todo: list[dict[str, Any]],
              summary: StageSummary, bar: Any, max_attempts: int) -> None:
    """Run `todo` on the engine, retrying failed tasks up to `max_attempts`; results land in `summary`."""
    attempts: Counter[str] = Counter()
    while todo:
        payloads = [(stage_name, config, str(ds.root), t) for t in todo]
        results = eng.run(payloads, lambda r: bar.update(1) if r["ok"] else None)
        # an engine that retries inside (Spark with spark.task.maxFailures > 1) used that many attempts:
        # one retry policy, whoever owns it, never the product of two
        per_run = max(1, int(eng.attempts_per_run))
        for t in todo:
            attempts[task_id(t)] += per_run
        retry = []
        for t, r in zip(todo, results, strict=True):
            tid = task_id(t)
            if r["ok"]:
                summary.shards_done += 1
                summary.failed.pop(tid, None)
            else:
                summary.failed[tid] = r["error"]
                log.warning("task %s failed (attempt %d/%d): %s", tid, attempts[tid],
                            max_attempts, (r["error"] or "").splitlines()[0])
                if attempts[tid] < max_attempts:
                    retry.append(t)
        todo = retry


def clean_stage_tmp(ds: DatasetDir, stage_name: str) -> int:
    """Remove every temporary file under the stage's own paths (call only while holding its lock)."""
    n = 0
    for p in ds.stage_paths(stage_name):
        if p.is_dir():
            n += clean_tmp(p, older_than_s=-1)
    # the killed tasks' own temp folders (curate.io.atomic), emptied above
    shutil.rmtree(ds.tasks_tmp(stage_name), ignore_errors=True)
    return n


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (Slurm's time limit, `kill`) unwinds like Ctrl-C, so the manifest records the stop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def with_workers(spec: EngineSpec, resources: Resources, visible_gpus: int) -> EngineSpec:
    """The engine spec with its worker count decided: what --workers said, else one local worker per visible
    GPU for a stage whose tasks take a GPU (each takes the GPU of its pool index, curate.devices.pick_device),
    one per CPU for a stage whose tasks mostly wait (download), else one."""
    if resources.overlap_tails and spec.name == "local":
        spec = dataclasses.replace(spec, overlap_tails=True)
    if spec.workers is not None:
        return spec
    gpus = visible_gpus if resources.gpus and spec.name == "local" else 0
    if resources.per_cpu and spec.name == "local" and not resources.gpus:
        return dataclasses.replace(spec, workers=cores())
    return dataclasses.replace(spec, workers=max(1, gpus))


def lend(spec: EngineSpec) -> contextlib.AbstractContextManager[RunContext]:
    """What a run on `spec` lends a stage (its SQL back end), for a stage function called outside a run
    (export --dry-run's counts)."""
    return using(RunContext(spec.name, None, _session(spec)))


def _session(spec: EngineSpec) -> Any:
    """The accessor of the engine's SparkSession for driver-side Spark SQL (None: DuckDB)."""
    if spec.name != "spark":
        return None
    return lambda: get_session(spec.spark_master)


