"""Spark concurrency follows the cluster: on a standalone cluster with one 1-core worker, a second worker
with 5 cores joins in the middle of a download, and the tasks running at once rise from 1 to 6.

Concurrency is measured where it happens: every shard holds one URL whose loopback route answers after
1.5 s, and the server counts the requests it is serving at once (one request per running task).
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import Concurrency, spark_worker, standalone_spark
from loopback import LoopServer, jpeg

from curate.cli import main

SHARDS = 40
FIRST, JOINING = 1, 5


@pytest.mark.spark
@pytest.mark.slow  # two JVM workers and 40 shard tasks: about two minutes on 2 cores
def test_tasks_in_flight_rise_when_a_worker_joins(tmp_path):
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("needs Java for Spark")
    server = LoopServer()
    busy = Concurrency()
    seen: list[tuple[float, int]] = []  # (time, requests in service) at each request's start
    body = jpeg()

    def slow(h, n):  # noqa: ANN001, ANN202
        with busy.hold():
            seen.append((time.monotonic(), busy.now))
            time.sleep(1.5)
            h.send(200, body)

    urls = []
    for i in range(SHARDS):
        server.routes[f"/{i}.jpg"] = slow
        urls.append(server.url(f"/{i}.jpg"))
    inp = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"c{i}" for i in range(SHARDS)]}), inp)
    out = tmp_path / "ds"
    rc: list[int] = []
    work = tmp_path / "spark"
    work.mkdir()
    try:
        with standalone_spark(work, dict(os.environ), cores=FIRST) as (master, env):
            run = threading.Thread(target=lambda: rc.append(main([
                "download", str(inp), "--out", str(out), "--url-col", "URL", "--caption-col", "TEXT",
                "--allow-host", server.endpoint, "--samples-per-shard", "1", "--threads", "1", "--timeout", "20",
                "--deadline", "30", "--no-progress", "--engine", "spark", "--spark-master", master])))
            run.start()
            t0 = time.monotonic()
            while len(seen) < 3 and run.is_alive() and time.monotonic() - t0 < 180:
                time.sleep(0.2)
            joined = time.monotonic()
            with spark_worker(master, env, work, cores=JOINING):
                run.join(timeout=600)
    finally:
        server.close()
    assert rc == [0] and not run.is_alive()
    before = [n for t, n in seen if t < joined]
    after = [n for t, n in seen if t >= joined]
    assert before and max(before) == FIRST  # one core: one task at a time
    assert max(after) == FIRST + JOINING  # every core of the new worker took a task
    assert len(seen) == SHARDS


def test_spark_attempts_per_runner_attempt():
    """Who retries: Spark's own attempts per runner round (the runner counts a round as that many)."""
    from curate.engines.spark import spark_task_attempts

    assert spark_task_attempts({"spark.master": "local[4]", "spark.task.maxFailures": "4"}) == 1  # local never
    assert spark_task_attempts({"spark.master": "local[4, 3]"}) == 3
    assert spark_task_attempts({"spark.master": "spark://h:7077", "spark.task.maxFailures": "1"}) == 1
    assert spark_task_attempts({"spark.master": "yarn"}) == 4  # Spark's default
