"""A real Spark standalone cluster (master + worker from pyspark's distribution) on 127.0.0.1.

`curate download`, `score`, `dedup` and `export` with `--engine spark --spark-master spark://...` give the local
engine's output; a task whose
first attempt dies after writing part of its shard is retried by Spark and leaves no duplicate output;
jobs/spark/submit.sh runs a command as a Spark application on the cluster.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import crash_env, standalone_spark, stop_active_spark_session

from curate.cli import main
from curate.io.shards import iter_raw

pytestmark = pytest.mark.spark
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("needs Java for Spark")
    work = tmp_path_factory.mktemp("spark")
    crash_dir = work / "crash-flags"
    # executors inherit the worker's environment: the test-only hook in tests/crash_hook (on their
    # PYTHONPATH) makes the first export shard task to write its tar die
    with standalone_spark(work, crash_env(CURATE_TEST_CRASH_ONCE=str(crash_dir))) as (master, env):
        yield {"master": master, "crash_dir": crash_dir, "env": env}


def _outputs(root: Path) -> tuple[dict, list]:
    tars = {}
    for tar in sorted((root / "shards").glob("*.tar")):
        tars[tar.name] = tar.read_bytes()
    return tars, pq.read_table(root / "ledger").to_pylist()


def test_export_on_a_standalone_cluster_equals_local_and_survives_a_killed_task(cluster, pipeline_dataset, tmp_path):
    src = pipeline_dataset  # read-only: the exports write elsewhere
    args = ["--policy", "datacomp-basic", "--policy", "dedup", "--samples-per-shard", "4", "--write-dropped"]
    assert main(["export", str(src), "--out", str(tmp_path / "local"), *args]) == 0
    out = tmp_path / "spark"
    rc = main(["export", str(src), "--out", str(out), *args, "--engine", "spark", "--spark-master", cluster["master"]])
    assert rc == 0
    # one shard task died (the Python worker exited) after its tar was in place; Spark re-ran it
    crashed = (cluster["crash_dir"] / "export-crashed").read_text().strip()
    assert (out / "shards" / f"{crashed}.tar").exists() and (out / "_done" / "export" / f"{crashed}.json").exists()
    assert len(list((out / "shards").glob("*.tar"))) >= 2
    local_tars, local_ledger = _outputs(tmp_path / "local")
    spark_tars, spark_ledger = _outputs(out)
    assert spark_tars == local_tars
    assert spark_ledger == local_ledger
    keys = [k for tar in sorted((out / "shards").glob("*.tar")) for k, _ in iter_raw(tar)]
    assert len(keys) == len(set(keys)) == len(local_ledger)
    assert not list(out.rglob(".tmp-*"))
    assert pq.read_table(out / "dropped.parquet").equals(pq.read_table(tmp_path / "local" / "dropped.parquet"))


@pytest.mark.slow  # a second Spark application: about a minute on 2 cores
def test_submit_script_runs_a_command_as_a_spark_application(cluster, pipeline_dataset, tmp_path):
    stop_active_spark_session()  # the worker's one core goes to the submitted application
    src = pipeline_dataset
    env = {**cluster["env"], "SPARK_MASTER": cluster["master"], "EXECUTOR_CORES": "1", "EXECUTOR_MEMORY": "512m",
           "DRIVER_MEMORY": "512m", "PYTHON": sys.executable, "CURATE_TEST_CRASH_ONCE": ""}
    out = tmp_path / "submitted"
    proc = subprocess.run([str(REPO / "jobs" / "spark" / "submit.sh"), "export", str(src), "--out", str(out),
                           "--policy", "laion"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["export", str(src), "--out", str(tmp_path / "local"), "--policy", "laion"]) == 0
    assert _outputs(out) == _outputs(tmp_path / "local")
    import json

    assert json.loads((out / "manifest.json").read_text())["stages"]["export"]["engine"] == "spark"


def test_download_on_a_standalone_cluster_equals_local(cluster, tmp_path):
    from curate.demo.web import DemoWeb, WebConfig

    with DemoWeb(WebConfig(seed=3, n=24, fault_rate=0.0, malformed_rows=False), tmp_path / "web") as web:
        args = [str(web.url_list), "--url-col", "URL", "--caption-col", "TEXT", "--keep-col", "SAMPLE_ID",
                "--image-size", "64", "--samples-per-shard", "10", "--no-progress"]
        for host in web.allow_hosts:
            args += ["--allow-host", host]
        assert main(["download", *args, "--out", str(tmp_path / "local")]) == 0
        assert main(["download", *args, "--out", str(tmp_path / "spark"), "--engine", "spark",
                     "--spark-master", cluster["master"]]) == 0
    local_tars, local_ledger = _outputs(tmp_path / "local")
    spark_tars, spark_ledger = _outputs(tmp_path / "spark")
    assert len(local_tars) >= 3 and spark_tars == local_tars

    def strip(rows: list) -> list:
        return [{k: v for k, v in r.items() if k != "elapsed"} for r in rows]

    assert strip(spark_ledger) == strip(local_ledger) and len(local_ledger) >= 24
    assert all(r["status"] == "success" for r in local_ledger)


def test_score_and_dedup_on_a_standalone_cluster_equal_local(cluster, tiny_model, tmp_path):
    """Score (tiny open_clip, loader workers inside Spark's Python workers) and every dedup phase run as
    Spark tasks on the cluster and write exactly what the local engine writes."""

    import numpy as np
    from dataset_factory import color_image, make_dataset
    from test_score import CAPTIONS

    cfg = tiny_model
    rows = [(color_image(i % 9), CAPTIONS[i % 4], "success") for i in range(12)]  # 3 byte-identical repeats
    dirs = {}
    for name, engine in (("local", []), ("spark", ["--engine", "spark", "--spark-master", cluster["master"]])):
        ds = make_dataset(tmp_path / name, rows, shard_size=4)
        assert main(["score", str(ds.root), "--model", str(cfg), "--pretrained", "none", "--no-progress",
                     "--batch-size", "4", *engine]) == 0
        assert main(["dedup", str(ds.root), "--no-progress", *engine]) == 0
        dirs[name] = ds
    local, spark = dirs["local"], dirs["spark"]
    assert len(local.shards()) == 3
    for s in local.shards():
        assert np.array_equal(np.load(spark.signals("score", s, ".img_emb.npy")),
                              np.load(local.signals("score", s, ".img_emb.npy")))
        assert pq.read_table(spark.signals("score", s)).to_pylist() == pq.read_table(local.signals("score", s)).to_pylist()
        assert pq.read_table(spark.signals("dedup", s)).to_pylist() == pq.read_table(local.signals("dedup", s)).to_pylist()
    dropped = sum(pq.read_table(local.signals("dedup", s)).column("is_duplicate").to_pylist().count(True)
                  for s in local.shards())
    assert dropped >= 3  # the byte-identical repeats at least: the comparison is not of empty decisions
