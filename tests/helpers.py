"""Small helpers shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CRASH_HOOK = Path(__file__).parent / "crash_hook"  # test-only crash injection (see its sitecustomize.py)


def crash_env(base: dict[str, str] | None = None, **hooks: str) -> dict[str, str]:
    """An environment whose Python processes load tests/crash_hook with `hooks` set (e.g.
    CURATE_TEST_CRASH_TASK="download:00000001"); `base` defaults to os.environ."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(CRASH_HOOK), *filter(None, [env.get("PYTHONPATH")])])
    env.update(hooks)
    return env


def kept_keys(cfg) -> list[str]:
    """The keys export's selection keeps for ExportConfig `cfg`, in output order: select() writes the keep lists
    to a temporary folder and they are read back whole (small test datasets only; export streams them)."""
    import math
    import tempfile

    from curate.stages.export import read_keep_list, select

    with tempfile.TemporaryDirectory(prefix="curate-select-") as tmp:
        sel = select(cfg, Path(tmp))
        parts = range(math.ceil(sel.kept_rows / cfg.samples_per_shard))
        return [k for i in parts for k in read_keep_list(Path(tmp), i)["key"].to_pylist()]


def copy_dataset(src: Path, dst: Path) -> Path:
    """A private, writable copy of a (session-scoped, shared) dataset dir."""
    shutil.copytree(src, dst)
    return dst


class Concurrency:
    """Counts how many callers are inside `hold()` at once; `max` is the most seen."""

    def __init__(self) -> None:
        self.now = 0
        self.max = 0
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, seconds: float = 0.0) -> Iterator[None]:
        with self._lock:
            self.now += 1
            self.max = max(self.max, self.now)
        try:
            time.sleep(seconds)
            yield
        finally:
            with self._lock:
                self.now -= 1


def run_threads(calls: list) -> None:
    """Run each zero-argument callable in its own thread, all at once, and wait for them all."""
    threads = [threading.Thread(target=c) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_active_spark_session() -> None:
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()


def _until(what: str, ok, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    t0 = time.time()
    while not ok():
        if proc.poll() is not None or time.time() - t0 > timeout:
            raise RuntimeError(f"spark {what} did not come up: {log.read_text()[-2000:]}")
        time.sleep(0.3)


@contextmanager
def standalone_spark(work: Path, env: dict[str, str], cores: int = 1) -> Iterator[tuple[str, dict[str, str]]]:
    """A standalone Spark master and one worker (`cores`, 1 GB) on 127.0.0.1; yields (master URL, the env).

    `env` is the processes' environment on top of which SPARK_HOME, SPARK_LOCAL_IP, PYSPARK_PYTHON and the
    log/work dirs (under `work`) are set; worker options (resources) go in env's SPARK_WORKER_OPTS. Any
    active session is stopped before and after; both processes are stopped on exit.
    """
    import pyspark

    home = Path(pyspark.__file__).parent
    env = {**env, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_HOME": str(home), "PYSPARK_PYTHON": sys.executable,
           "SPARK_LOG_DIR": str(work / "logs"), "SPARK_WORKER_DIR": str(work / "worker")}
    port = free_port()
    procs: list[subprocess.Popen] = []
    mlog, wlog = work / "master.log", work / "worker.log"

    def master_up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        procs.append(subprocess.Popen(
            [str(home / "bin" / "spark-class"), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
             "--port", str(port), "--webui-port", str(free_port())], env=env, stdout=mlog.open("w"),
            stderr=subprocess.STDOUT))
        _until("master", master_up, procs[0], mlog)
        procs.append(subprocess.Popen(
            [str(home / "bin" / "spark-class"), "org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{port}",
             "--host", "127.0.0.1", "--cores", str(cores), "--memory", "1g", "--webui-port", str(free_port())],
            env=env, stdout=wlog.open("w"), stderr=subprocess.STDOUT))
        _until("worker", lambda: "Successfully registered with master" in wlog.read_text(), procs[1], wlog)
        stop_active_spark_session()
        os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
        yield f"spark://127.0.0.1:{port}", env
    finally:
        stop_active_spark_session()
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@contextmanager
def spark_worker(master: str, env: dict[str, str], work: Path, cores: int, name: str = "worker2",
                 wait: bool = True) -> Iterator[subprocess.Popen]:
    """One more standalone worker (`cores`, 1 GB) joining `master` (from standalone_spark, with its `env`);
    with `wait`, returns once the master registered it. Stopped on exit."""
    home = Path(env["SPARK_HOME"])
    log = work / f"{name}.log"
    env = {**env, "SPARK_WORKER_DIR": str(work / name)}
    proc = subprocess.Popen(
        [str(home / "bin" / "spark-class"), "org.apache.spark.deploy.worker.Worker", master, "--host", "127.0.0.1",
         "--cores", str(cores), "--memory", "1g", "--webui-port", str(free_port())],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        if wait:
            _until(name, lambda: "Successfully registered with master" in log.read_text(), proc, log)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
