"""The SparkSession curate uses: the Spark engine schedules tasks on it, and the Spark SQL back end of
driver-side queries (export's selection, balance's reduce) runs on it. Only the engines and the runner open
it; a stage gets it from the runner (`curate.stages.base.context().spark()`)."""

from __future__ import annotations

import os
import sys

from curate.errors import InputError

SPARK_EXTRA_HINT = "pip install 'curate[spark]'"


def get_session(master: str = "local[*]", app_name: str = "curate"):
    """The active SparkSession (spark-submit), or a new one on `master`."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise InputError(f"Spark needs pyspark, which is not installed: it comes with the spark extra "
                         f"({SPARK_EXTRA_HINT})") from None  # never a silent local run

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
        .config("spark.task.maxFailures", "1")  # the runner owns retries (curate/engines/spark.py)
        .config("spark.ui.enabled", "false")
        .config("spark.python.worker.reuse", "true")
    )
    if os.environ.get("SPARK_LOCAL_IP"):
        builder = builder.config("spark.driver.host", os.environ["SPARK_LOCAL_IP"])
        builder = builder.config("spark.driver.bindAddress", os.environ["SPARK_LOCAL_IP"])
    return builder.getOrCreate()
