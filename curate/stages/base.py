"""The Stage base class every stage derives from, what the runner lends a stage while it runs, and the task
function every engine calls.

A stage plans a list of JSON-able tasks and processes one task at a time. Engines ship only (stage name,
config dict, dataset dir, task) to workers and re-enter through `execute_task`, so no pickled state crosses
process or machine boundaries. The runner (curate/runner.py) calls the hooks below in this order:
`validate`, `fingerprint_inputs`, `resources`, `output_key`, [`discard_outputs`], `phases`, then per phase
`plan_phase` and the tasks' `run_shard` (+ `reads`), and last `finalize` and `inputs`.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from curate.config import from_dict
from curate.errors import InputError
from curate.io.atomic import read_json, remove_shard_tmp, set_task_tmp, write_json
from curate.io.layout import DatasetDir, task_id
from curate.io.lineage import read_identities
from curate.stages import get_stage


@dataclass(frozen=True)
class Resources:
    """What one task of a stage takes: `gpus` and `per_cpu` decide the local engine's workers when --workers
    is not given (one per visible GPU for a stage whose tasks take one, one per CPU for a stage that asks for
    it, else one); `cpus`, the cores a task keeps busy
    with its own threads, is the stage's word to a scheduler (nothing reads it yet)."""

    cpus: int = 1
    gpus: int = 0
    per_cpu: bool = False  # one local worker per CPU when --workers is not given (tasks that mostly wait)
    # a task's end mostly waits (download: the last slow answers): the local engine runs a quarter more
    # processes than workers, and a task holds one of `workers` places only until it calls leave_place()
    overlap_tails: bool = False


# the local engine's places (a semaphore of `workers`), in a worker process of a stage with overlap_tails
_PLACES: Any = None


def set_places(places: Any) -> None:
    """Called in each worker process by the local engine (None elsewhere: every task has a place)."""
    global _PLACES
    _PLACES = places


class _Place:
    """The place a running task holds; `leave` gives it back, once."""

    def __init__(self, places: Any):
        self.places = places
        self.held = True
        places.acquire()

    def leave(self) -> None:
        if self.held:
            self.held = False
            self.places.release()


_PLACE: contextvars.ContextVar[_Place | None] = contextvars.ContextVar("curate_place", default=None)


@contextlib.contextmanager
def _task_place() -> Iterator[None]:
    """Hold one of the engine's places while the task runs (until it calls leave_place()); without places
    (one worker, Spark, Slurm, a stage without overlap_tails) it does nothing."""
    place = _Place(_PLACES) if _PLACES is not None else None
    token = _PLACE.set(place)
    try:
        yield
    finally:
        _PLACE.reset(token)
        if place is not None:
            place.leave()


def holds_place() -> bool:
    """True in a task that still holds one of the engine's places (see leave_place)."""
    place = _PLACE.get()
    return place is not None and place.held


def leave_place() -> None:
    """For a stage's run_shard, in the task's own thread: what is left of this task only waits, so the
    engine may start the next task beside it (idempotent)."""
    place = _PLACE.get()
    if place is not None:
        place.leave()


@dataclass(frozen=True)
class RunContext:
    """What the runner lends a stage's driver-side steps (plan, plan_phase, finalize) for one run: which
    engine runs the tasks, this run's slice of a Slurm array, and the SQL back end of driver-side reduces
    (DuckDB in this process, or Spark SQL on the engine's session with --engine spark). A stage never
    imports an engine or builds a session itself."""

    engine: str = "local"
    array_slice: tuple[int, int] | None = None  # (index, count) inside a Slurm array, else None
    spark_session: Callable[[], Any] | None = None  # the engine's session, opened on first use
    workers: int = 1  # the engine's task processes (local: --workers or what the stage's resources chose)

    @property
    def sql(self) -> str:
        """"spark" when reduces run on Spark SQL, else "duckdb"."""
        return "spark" if self.spark_session is not None else "duckdb"

    def spark(self) -> Any:
        if self.spark_session is None:
            raise InputError("Spark SQL needs --engine spark")
        return self.spark_session()


_CONTEXT: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar("curate_run_context", default=None)


def context() -> RunContext:
    """The RunContext of the run in progress (outside a run: the local engine, DuckDB, no array)."""
    return _CONTEXT.get() or RunContext()


@contextlib.contextmanager
def using(ctx: RunContext) -> Iterator[RunContext]:
    """Make `ctx` the RunContext for the block (the runner wraps a run in it; so does a command that queries
    outside a run, e.g. export --dry-run)."""
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)


class Stage:
    """A stage: `name`, `config_cls`, `plan` and `run_shard` are its own; every other hook has a default.

    Register it with one line in curate/stages/__init__.py (`register(name, "module:STAGE", ...)`): the runner,
    the engines, `curate NAME` (a generic command unless the registry names a command module), pipeline YAML
    checking, the Python API and docs/OPTIONS.md then know it.
    """

    name: str = ""
    config_cls: type = object
    # phases planned again after each round until their plan has nothing left to run (dedup's resolve)
    repeated_phases: tuple[str, ...] = ()
    # whether a Slurm array may split the plan (--shard-index/--num-shards, the engine spec): each array task
    # runs tasks[index::num] of the same plan; only for a single-phase stage whose tasks are independent
    array_slices: bool = False

    # ---- before anything is written ----
    def validate(self, cfg: Any, ds: DatasetDir) -> None:
        """Refuse a bad config or unusable inputs (InputError: exit 2) before any lock, file or manifest entry."""

    def fingerprint_inputs(self, cfg: Any, ds: DatasetDir) -> dict[str, Any]:
        """What besides the config decides the outputs (input file sizes, model hashes, upstream digests): part
        of the fingerprint, so another input is refused like another config (or redone with --redo)."""
        return {}

    def resources(self, cfg: Any) -> Resources:
        """What one task takes (see Resources)."""
        return Resources()

    def output_key(self, cfg: Any) -> str:
        """Where the outputs are keyed (markers, stats, signals, manifest entry): the stage name, unless the
        config names another (`curate score --name NAME`)."""
        return self.name

    def discard_outputs(self, cfg: Any, ds: DatasetDir) -> None:
        """Remove outputs only the stage knows of, beyond its own paths (--redo, a new fingerprint)."""

    # ---- planning (driver: O(tasks) work, bounded memory) ----
    def phases(self, cfg: Any, ds: DatasetDir) -> tuple[str | None, ...]:
        """Task phases run in order, each planned once the previous one completed; (None,): one plan."""
        return (None,)

    def plan(self, cfg: Any, ds: DatasetDir) -> list[dict[str, Any]]:
        """The tasks of this run; each is JSON-able with a unique id (its "task" field, else its "shard")."""
        raise NotImplementedError(f"stage {self.name}: plan")

    def plan_phase(self, cfg: Any, ds: DatasetDir, phase: str | None) -> list[dict[str, Any]]:
        """The tasks of one phase (a single-phase stage: its plan)."""
        return self.plan(cfg, ds)

    # ---- a task (worker: one task, atomic outputs, bounded memory) ----
    def run_shard(self, cfg: Any, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
        """Process one task: write its outputs atomically and return its stats (JSON-able)."""
        raise NotImplementedError(f"stage {self.name}: run_shard")

    def reads(self, cfg: Any, ds: DatasetDir, task: dict[str, Any]) -> list[tuple[str, str]]:
        """The upstream (stage, task) runs `task` reads (lineage, curate.io.lineage): a done task whose upstream
        ran again since runs again."""
        return []

    @property
    def has_lineage(self) -> bool:
        """Whether the stage declares `reads` (without, a resume reads no markers to check them)."""
        return type(self).reads is not Stage.reads

    # ---- after the tasks (driver: reads per-task stats only) ----
    def finalize(self, cfg: Any, ds: DatasetDir) -> dict[str, Any]:
        """The run's counts for the manifest and the summary: by default every done task's stats added up."""
        return sum_stats(ds, self.output_key(cfg))

    def inputs(self, cfg: Any) -> dict[str, Any]:
        """What the manifest records about the inputs (not part of the fingerprint)."""
        return {}


@dataclass
class TaskResult:
    task: str  # the task id (see curate.io.layout.task_id), not necessarily a shard id
    ok: bool
    stats: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    attempts: int = 1
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def execute_task(stage_name: str, config: dict[str, Any], root: str, task: dict[str, Any]) -> dict[str, Any]:
    """Run one shard task in whatever process the engine chose; the marker is written last.

    Returns a TaskResult as a dict; exceptions are caught and reported, never raised, so one bad
    shard cannot take the others down with it.
    """
    t0 = time.time()
    stage = get_stage(stage_name)
    ds = DatasetDir.at(root)
    tid = task_id(task)
    try:
        cfg = from_dict(stage.config_cls, config)
        key = stage.output_key(cfg)
        tmp = ds.task_tmp(key, tid)
        remove_shard_tmp(tmp)
        set_task_tmp(tmp)
        # the identities of the upstream task runs this task reads, taken before it reads them: an upstream
        # rerun while this task runs leaves this marker stale, never falsely current
        reads = read_identities(ds, stage.reads(cfg, ds, task))
        with _task_place():
            stats = stage.run_shard(cfg, ds, task)
        stats = dict(stats or {})
        write_json(ds.stats(key, tid), stats)
        # "run" makes each completion's marker (and so its identity) unique, even with equal stats
        write_json(ds.marker(key, tid), {"task": tid, "stats": stats, "run": uuid.uuid4().hex, "reads": reads})
        remove_shard_tmp(tmp)  # empty now: leave no folder per task behind
        return TaskResult(tid, True, stats, seconds=time.time() - t0).to_dict()
    except Exception as e:  # reported in the summary and the exit code
        msg = f"{type(e).__name__}: {e}"
        tb = traceback.format_exc(limit=6)
        return TaskResult(tid, False, error=msg + "\n" + tb, seconds=time.time() - t0).to_dict()
    finally:
        set_task_tmp(None)


def sum_stats(ds: DatasetDir, stage_name: str) -> dict[str, Any]:
    """Add up the numeric and dict-of-count fields of every done shard's stats."""
    total: dict[str, Any] = {}
    for tid in ds.done_tasks(stage_name):
        p = ds.stats(stage_name, tid)
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
