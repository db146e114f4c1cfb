"""The Stage contract shared by every stage, and the task function every engine calls.

A stage plans a list of JSON-able shard tasks and processes one task at a time. Engines ship only
(stage name, config dict, dataset dir, task) to workers and re-enter through `execute_task`, so no
pickled state crosses process or machine boundaries.
"""

from __future__ import annotations

import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from curate.config import from_dict
from curate.io.atomic import remove_shard_tmp, set_task_tmp, write_json
from curate.io.layout import DatasetDir, task_id
from curate.io.lineage import read_identities, stage_reads


class Stage(Protocol):
    name: str
    config_cls: type

    def plan(self, cfg: Any, ds: DatasetDir) -> list[dict[str, Any]]:
        """The tasks of this run; each is JSON-able with a unique id (its "task" field, else its "shard")."""
        ...

    def run_shard(self, cfg: Any, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
        """Process one shard: write its outputs atomically and return its stats (JSON-able)."""
        ...


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


def output_key(stage: Any, cfg: Any, stage_name: str) -> str:
    """Where a stage's outputs are keyed (markers, stats, signals, manifest entry): the stage name, unless
    the stage derives another from its config (`curate score --name NAME` writes under NAME)."""
    fn = getattr(stage, "output_key", None)
    return fn(cfg) if fn else stage_name


def execute_task(stage_name: str, config: dict[str, Any], root: str, task: dict[str, Any]) -> dict[str, Any]:
    """Run one shard task in whatever process the engine chose; the marker is written last.

    Returns a TaskResult as a dict; exceptions are caught and reported, never raised, so one bad
    shard cannot take the others down with it.
    """
    from curate.stages import get_stage

    t0 = time.time()
    stage = get_stage(stage_name)
    ds = DatasetDir.at(root)
    tid = task_id(task)
    try:
        cfg = from_dict(stage.config_cls, config)
        key = output_key(stage, cfg, stage_name)
        tmp = ds.task_tmp(key, tid)
        remove_shard_tmp(tmp)
        set_task_tmp(tmp)
        # the identities of the upstream task runs this task reads, taken before it reads them: an upstream
        # rerun while this task runs leaves this marker stale, never falsely current
        reads = read_identities(ds, stage_reads(stage, cfg, ds, task))
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
    from curate.io.atomic import read_json

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
