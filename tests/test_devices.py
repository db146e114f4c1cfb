"""Which GPU each worker takes, checked without a GPU on the real schedulers' own inputs.

- Local engine: the worker processes of a real spawn pool (the engine's pool, its initializer) read their
  facts with `curate.devices.process_facts` and land on distinct GPUs.
- Spark: a real standalone cluster on 127.0.0.1 whose worker owns two GPU addresses (a resources file,
  as a discovery script would give): each task, through the Spark engine's own `_publish_task_gpus`,
  takes the address Spark assigned it, and concurrent tasks get different ones.

Only torch's GPU count is given by hand (there is no GPU here); everything else is what the scheduler
handed the process.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from helpers import standalone_spark

from curate.devices import pick_device, process_facts


def _facts_when_all_run(rendezvous: str, n: int) -> dict:
    """In a pool worker: this process's facts, returned only once n tasks run at the same time, so each
    of the n tasks is held by its own worker process (however slowly the machine spawns them)."""
    Path(rendezvous, str(os.getpid())).touch()
    t0 = time.time()
    while len(os.listdir(rendezvous)) < n and time.time() - t0 < 120:
        time.sleep(0.05)
    return {"pid": os.getpid(), **process_facts()}


def test_local_pool_workers_each_take_their_own_gpu(tmp_path):
    import multiprocessing as mp

    from curate.engines.local import _watch_parent

    gpus = 3
    with ProcessPoolExecutor(max_workers=gpus, mp_context=mp.get_context("spawn"), initializer=_watch_parent,
                             initargs=(os.getpid(),)) as pool:
        facts = list(pool.map(_facts_when_all_run, [str(tmp_path)] * gpus, [gpus] * gpus))
    assert len({f["pid"] for f in facts}) == gpus  # one task per worker process
    devices = sorted(pick_device("cuda", cuda_count=gpus, **{k: v for k, v in f.items() if k != "pid"})
                     for f in facts)
    assert devices == ["cuda:0", "cuda:1", "cuda:2"]
    # the driver itself (the one-worker engine runs tasks in it) takes the first GPU
    assert pick_device("cuda", cuda_count=gpus, **process_facts()) == "cuda:0"


# --- Spark: a worker with GPU addresses -----------------------------------------------------------------


def _spark_task(i: int) -> dict:
    """One Spark task: the engine's hand-over of TaskContext resources, then this process's facts."""
    from curate.engines.spark import _publish_task_gpus

    _publish_task_gpus()
    time.sleep(1.0)  # two tasks at a time on the executor's two cores: each holds its GPU meanwhile
    from curate.devices import TASK_GPUS_ENV, process_facts

    return {"i": i, "env": os.environ.get(TASK_GPUS_ENV), **process_facts()}


@pytest.mark.spark
@pytest.mark.slow  # a master, a worker and an application: about 30 s on 2 cores
def test_spark_tasks_score_on_the_gpu_spark_assigned_them(tmp_path):
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("needs Java for Spark")
    from pyspark.sql import SparkSession

    resources = tmp_path / "gpus.json"  # what spark.worker.resourcesFile expects
    resources.write_text(json.dumps([{"id": {"componentName": "spark.worker", "resourceName": "gpu"},
                                      "addresses": ["0", "1"]}]))
    env = {**os.environ,
           "SPARK_WORKER_OPTS": f"-Dspark.worker.resource.gpu.amount=2 -Dspark.worker.resourcesFile={resources}",
           # executors unpickle _spark_task by reference: they import this file's module
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    with standalone_spark(tmp_path, env, cores=2) as (master, _):
        # what jobs/spark/submit.sh sets with GPUS_PER_EXECUTOR=2 GPU_PER_TASK=1
        spark = (SparkSession.builder.master(master).appName("curate-gpu-test")
                 .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
                 .config("spark.ui.enabled", "false").config("spark.executor.cores", "2")
                 .config("spark.executor.memory", "512m")
                 .config("spark.executor.resource.gpu.amount", "2").config("spark.task.resource.gpu.amount", "1")
                 .getOrCreate())
        try:
            got = spark.sparkContext.parallelize(range(6), 6).map(_spark_task).collect()
        finally:
            spark.stop()
    assert len(got) == 6
    for t in got:
        assert t["env"] in ("0", "1") and t["task_gpus"] == [t["env"]], t  # exactly the one GPU Spark gave it
        # torch would see the executor's 2 GPUs: the task takes the one Spark assigned, whatever its pool slot
        assert pick_device("cuda", cuda_count=2, task_gpus=t["task_gpus"], visible=t["visible"],
                           worker_index=t["worker_index"]) == f"cuda:{t['env']}"
    assert {t["env"] for t in got} == {"0", "1"}  # concurrent tasks were given both GPUs
