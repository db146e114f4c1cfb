"""Spark engine: one Spark task per shard; tasks re-enter curate through `execute_task`.

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
    from curate.stages.base import execute_task

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
    try:
        from pyspark.sql import SparkSession
    except ImportError as e:  # a missing backend raises; it never silently runs locally
        from curate.errors import InputError

        raise InputError("--engine spark needs pyspark: pip install pyspark") from e
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
        spark = get_session(self.master)
        sc = spark.sparkContext
        data = [json.dumps(list(p)) for p in payloads]
        rdd = sc.parallelize(data, numSlices=len(data))
        out = [json.loads(s) for s in rdd.map(_run_json).collect()]
        for r in out:
            on_result(r)
        return out
