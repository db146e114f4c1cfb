"""Spark engine: one Spark job of one task per shard; tasks re-enter curate through `execute_task`.

Jobs are submitted from a small thread pool (as many as the cluster has task slots, plus a few), so
results stream back shard by shard as they finish, and a shard whose task fails on every Spark attempt
(an executor lost, a worker killed) is one failed result while every other shard's result is kept.
Speculative execution is switched off, and each task commits its outputs by atomic rename, so a
task that Spark retries after a failure overwrites its own partial work and never duplicates it.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from curate.engines.base import OnResult, Payload


def _run_json(payload_json: str) -> str:
    from curate.logs import configure_task_process
    from curate.stages.base import execute_task

    configure_task_process()
    stage, config, root, task = json.loads(payload_json)
    _publish_task_gpus()
    return json.dumps(execute_task(stage, config, root, task))


def _publish_task_gpus() -> None:
    """Hand the GPUs Spark assigned this task (spark.task.resource.gpu.amount) to stage code through the
    environment (stages never import pyspark); cleared when the task got none (Python workers are reused)."""
    from pyspark import TaskContext

    from curate.devices import TASK_GPUS_ENV, spark_task_gpus

    ctx = TaskContext.get()
    gpus = spark_task_gpus(ctx.resources()) if ctx is not None else []
    if gpus:
        os.environ[TASK_GPUS_ENV] = ",".join(gpus)
    else:
        os.environ.pop(TASK_GPUS_ENV, None)


def get_session(master: str = "local[*]", app_name: str = "curate"):
    """The active SparkSession (spark-submit), or a new one on `master`."""
    from curate.engines.base import require_pyspark

    require_pyspark()  # a missing backend raises; it never silently runs locally
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    if master.startswith("local"):
        # a local run never needs the machine's interface address
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.speculation", "false")
        .config("spark.task.maxFailures", "4")
        .config("spark.ui.enabled", "false")
        .config("spark.python.worker.reuse", "true")
    )
    if os.environ.get("SPARK_LOCAL_IP"):
        builder = builder.config("spark.driver.host", os.environ["SPARK_LOCAL_IP"])
        builder = builder.config("spark.driver.bindAddress", os.environ["SPARK_LOCAL_IP"])
    return builder.getOrCreate()


class SparkEngine:
    def __init__(self, master: str = "local[*]", workers: int = 1):
        self.master = master
        self.workers = workers

    def run(self, payloads: list[Payload], on_result: OnResult) -> list[dict[str, Any]]:
        if not payloads:
            return []
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        spark = get_session(self.master)
        sc = spark.sparkContext
        slots = max(1, int(sc.defaultParallelism)) + 2  # a few extra: the next job is ready when a slot frees
        results: list[dict[str, Any] | None] = [None] * len(payloads)
        queue = iter(range(len(payloads)))
        with ThreadPoolExecutor(max_workers=slots, thread_name_prefix="curate-spark") as pool:
            futs = {}

            def feed() -> None:
                while len(futs) < slots:
                    i = next(queue, None)
                    if i is None:
                        return
                    futs[pool.submit(_one_job, sc, payloads[i])] = i

            feed()
            while futs:
                done, _ = wait(list(futs), return_when=FIRST_COMPLETED)
                for f in done:
                    i = futs.pop(f)
                    r = f.result()
                    results[i] = r
                    on_result(r)
                feed()
        return [r for r in results if r is not None]


def _one_job(sc: Any, payload: Payload) -> dict[str, Any]:
    """One shard as one Spark job; a job that fails (every attempt) is a failed result, not an exception."""
    from curate.io.layout import task_id
    from curate.stages.base import TaskResult

    tid = task_id(payload[3])
    try:
        sc.setJobDescription(f"curate {payload[0]} {tid}")
        out = sc.parallelize([json.dumps(list(payload))], 1).map(_run_json).collect()
        return json.loads(out[0])
    except Exception as e:  # noqa: BLE001 - Py4JJavaError and friends: this shard failed, the others go on
        msg = str(e).strip().splitlines()
        first = next((ln for ln in msg if "Error" in ln or "Exception" in ln), msg[0] if msg else repr(e))
        return TaskResult(tid, False, error=f"Spark job for {tid} failed: {first}\n{str(e)[:4000]}").to_dict()
