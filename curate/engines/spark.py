"""Spark engine: shard tasks grouped into small Spark jobs; tasks re-enter curate through `execute_task`.

Concurrency follows the cluster. The task slots (executor cores / spark.task.cpus) are read again every
second while tasks run, never once: under dynamic allocation a session starts with few executors, and as
they come and go the number of tasks handed to Spark follows, at twice the slots, so Spark always sees a
backlog (which is what makes dynamic allocation ask for more executors) and a freed slot never waits on
the driver. Tasks go out in jobs of about half the slots each, so a run of 100,000 shards is a few
thousand Spark jobs, not 100,000, while results still come back every few tasks.

One retry policy, one owner: a session curate creates sets spark.task.maxFailures=1, so a failing task
fails its job at once and the runner retries it (3 attempts) as it does on every engine.
A session that was given another value (spark-submit --conf spark.task.maxFailures=N) keeps it, and the
runner then counts each round as N attempts, so a task never runs more than max(N, runner attempts) times.
When a job fails, only the task Spark names as the cause is a failed result; its siblings that had not
finished (cancelled with the job) are resubmitted without using an attempt, and those that had finished
are read back from their markers. Speculative execution is off, and each task commits its outputs by
atomic rename, so a task that runs again overwrites its own partial work and never duplicates it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from curate.config import from_dict
from curate.devices import TASK_GPUS_ENV, spark_task_gpus
from curate.engines.base import OnResult, Payload
from curate.engines.session import get_session
from curate.io.atomic import read_json
from curate.io.layout import DatasetDir, task_id
from curate.logs import configure_task_process
from curate.stages import get_stage
from curate.stages.base import TaskResult, execute_task


def _run_json(payload_json: str) -> str:
    configure_task_process()
    stage, config, root, task = json.loads(payload_json)
    _publish_task_gpus()
    return json.dumps(execute_task(stage, config, root, task))


def _publish_task_gpus() -> None:
    """Hand the GPUs Spark assigned this task (spark.task.resource.gpu.amount) to stage code through the
    environment (stages never import pyspark); cleared when the task got none (Python workers are reused)."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    gpus = spark_task_gpus(ctx.resources()) if ctx is not None else []
    if gpus:
        os.environ[TASK_GPUS_ENV] = ",".join(gpus)
    else:
        os.environ.pop(TASK_GPUS_ENV, None)


IN_FLIGHT_PER_SLOT = 2  # tasks handed to Spark per task slot: the slots, plus a backlog as large
POLL_S = 1.0  # how often the slots are read again while every job in flight is still running


def live_slots(sc: Any) -> int:
    """Task slots of the executors registered now: their cores / spark.task.cpus.

    `defaultParallelism` is the scheduler's current total of executor cores (it follows executors as they
    register and leave) unless spark.default.parallelism pins it; then executors x spark.executor.cores.
    """
    conf = sc.getConf()
    per_task = max(1, int(conf.get("spark.task.cpus", "1")))
    if conf.contains("spark.default.parallelism") and not (conf.get("spark.master") or "").startswith("local"):
        executors = max(0, len(sc._jsc.sc().statusTracker().getExecutorInfos()) - 1)  # less the driver
        cores = executors * int(conf.get("spark.executor.cores", "1"))
    else:
        cores = int(sc._jsc.sc().defaultParallelism())
    return max(1, cores // per_task)


def spark_task_attempts(conf: Any) -> int:
    """How many times Spark itself runs a failing task: spark.task.maxFailures (default 4) on a cluster; in
    local mode the F of local[N, F] (Spark ignores maxFailures there; plain local[N] never retries)."""
    import re

    master = conf.get("spark.master") or ""
    if master.startswith("local"):
        m = re.match(r"local\[[^,\]]+,\s*(\d+)\]", master)
        return max(1, int(m.group(1))) if m else 1
    return max(1, int(conf.get("spark.task.maxFailures", "4")))


class SparkEngine:
    def __init__(self, master: str = "local[*]", workers: int = 1):
        self.master = master
        self.workers = workers
        self.attempts_per_run = 1  # Spark attempts per runner attempt (spark.task.maxFailures), set by run()
        self.slots_seen: list[int] = []  # the task slots, each time they changed (logged, for tests and reports)
        self.max_in_flight = 0

    def run(self, payloads: list[Payload], on_result: OnResult) -> list[dict[str, Any]]:
        """Run every payload once (Spark's own attempts aside); see the module docstring for the scheduling."""
        if not payloads:
            return []
        from collections import deque
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        spark = get_session(self.master)
        sc = spark.sparkContext
        self.attempts_per_run = spark_task_attempts(sc.getConf())
        results: list[dict[str, Any] | None] = [None] * len(payloads)
        pending = deque(range(len(payloads)))
        futs: dict[Any, list[int]] = {}
        with ThreadPoolExecutor(max_workers=64, thread_name_prefix="curate-spark") as pool:
            while pending or futs:
                slots = self._slots(sc)
                in_flight = sum(len(b) for b in futs.values())
                target = IN_FLIGHT_PER_SLOT * slots
                while pending and in_flight < target and len(futs) < 64:
                    size = min(len(pending), target - in_flight, max(1, (slots + 1) // 2))
                    batch = [pending.popleft() for _ in range(size)]
                    futs[pool.submit(_run_batch, sc, [payloads[i] for i in batch])] = batch
                    in_flight += size
                self.max_in_flight = max(self.max_in_flight, in_flight)
                done, _ = wait(list(futs), timeout=POLL_S, return_when=FIRST_COMPLETED)
                for f in done:
                    batch = futs.pop(f)
                    for i, r in zip(batch, f.result(), strict=True):
                        if r is None:  # cancelled with a sibling's failed job: runs again, no attempt used
                            pending.appendleft(i)
                            continue
                        results[i] = r
                        on_result(r)
        return [r for r in results if r is not None]

    def _slots(self, sc: Any) -> int:
        import logging

        n = live_slots(sc)
        if not self.slots_seen or self.slots_seen[-1] != n:
            logging.getLogger(__name__).info("spark: %d task slot(s)%s", n,
                                             f" (was {self.slots_seen[-1]})" if self.slots_seen else "")
            self.slots_seen.append(n)
        return n


def _run_batch(sc: Any, batch: list[Payload]) -> list[dict[str, Any] | None]:
    """One Spark job of one task per payload. Every task's result, when the job succeeds. When it fails
    (a task that failed all its Spark attempts: its process died), the task Spark names is a failed
    result, siblings whose marker shows they finished are read back, and the rest are None (run again)."""

    tids = [task_id(p[3]) for p in batch]
    try:
        sc.setJobDescription(f"curate {batch[0][0]} {tids[0]}" + (f" +{len(batch) - 1}" if len(batch) > 1 else ""))
        out = sc.parallelize([json.dumps(list(p)) for p in batch], len(batch)).map(_run_json).collect()
        return [json.loads(o) for o in out]
    except Exception as e:  # noqa: BLE001 - Py4JJavaError and friends: this job failed, the others go on
        return _after_failed_job(batch, tids, e)


def _after_failed_job(batch: list[Payload], tids: list[str], e: Exception) -> list[dict[str, Any] | None]:
    import re


    text = str(e)
    lines = text.strip().splitlines()
    first = next((ln for ln in lines if "Error" in ln or "Exception" in ln), lines[0] if lines else repr(e))
    m = re.search(r"Task (\d+) in stage \S+ failed", text)
    culprit = int(m.group(1)) if m and int(m.group(1)) < len(batch) else None
    out: list[dict[str, Any] | None] = []
    for k, (payload, tid) in enumerate(zip(batch, tids, strict=True)):
        if culprit is None or k == culprit:
            out.append(TaskResult(tid, False, error=f"Spark job for {tid} failed: {first}\n{text[:4000]}").to_dict())
        else:
            out.append(_finished(payload, tid))
    return out


def _finished(payload: Payload, tid: str) -> dict[str, Any] | None:
    """The result of a task that completed in a job that failed afterwards (its marker), else None."""
    stage_name, config, root, _task = payload
    stage = get_stage(stage_name)
    key = stage.output_key(from_dict(stage.config_cls, config))
    try:
        marker = read_json(DatasetDir.at(root).marker(key, tid))
    except (OSError, ValueError):
        return None
    return TaskResult(tid, True, marker.get("stats") or {}).to_dict()
