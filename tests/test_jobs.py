"""Slurm array templates: each array index runs in-process the exact command the template would run, and
the union of the slices equals a local run. Also checks every template's flags against the real command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from curate.cli import cli, main

SLURM = Path(__file__).resolve().parents[1] / "jobs" / "slurm"
_PARAM = re.compile(r"\$\{(\w+)(?::([?-])([^}]*))?\}|\$(\w+)")


def command_line(template: Path) -> str:
    lines = [ln for ln in template.read_text().splitlines() if ln.startswith("curate ")]
    assert len(lines) == 1, f"{template}: one `curate ...` line expected"
    return lines[0]


def expand(line: str, env: dict[str, str]) -> list[str]:
    """bash parameter expansion for what the templates use: $X, ${X}, ${X:?msg}, ${X:-default}."""
    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(4)
        if env.get(name):
            return shlex.quote(env[name])
        if m.group(2) == "?":
            raise KeyError(f"{name}: {m.group(3)}")
        return m.group(3) or ""

    return shlex.split(_PARAM.sub(sub, line))


def test_export_array_slices_union_equals_a_local_run(pipeline_dataset, tmp_path):
    source = pipeline_dataset  # read-only: the exports write elsewhere
    common = "--policy dedup --samples-per-shard 3"
    assert main(["export", str(source), "--out", str(tmp_path / "local"), *common.split()]) == 0
    line = command_line(SLURM / "export.sbatch")
    count = 3
    for i in range(count):
        env = {"DATASET": str(source), "OUT": str(tmp_path / "array"), "CURATE_ARGS": "",
               "SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_COUNT": str(count)}
        argv = expand(line, env) + common.split()  # CURATE_ARGS is word-split by bash, as here
        assert argv[0] == "curate"
        assert main(argv[1:]) == 0
        done = sorted(p.stem for p in (tmp_path / "array" / "_done" / "export").glob("*.json"))
        assert all(int(s) % count <= i for s in done)  # slice i wrote only its own shards
    local = sorted(p.name for p in (tmp_path / "local" / "shards").glob("*.tar"))
    assert len(local) >= 5
    for sub in ("shards", "ledger"):
        names = sorted(p.name for p in (tmp_path / "local" / sub).iterdir())
        assert sorted(p.name for p in (tmp_path / "array" / sub).iterdir()) == names
        for n in names:
            assert (tmp_path / "array" / sub / n).read_bytes() == (tmp_path / "local" / sub / n).read_bytes()


def test_expand_refuses_a_missing_required_variable():
    with pytest.raises(KeyError, match="DATASET"):
        expand(command_line(SLURM / "score.sbatch"), {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"})


@pytest.mark.parametrize("name", ["score", "download", "download_plan", "dedup", "export", "adopt"])
def test_template_flags_exist_on_the_command(name):
    line = command_line(SLURM / f"{name}.sbatch")
    argv = expand(line, {"DATASET": "/d", "SRC": "/s", "OUT": "/o", "URL_LIST": "/u.parquet", "SLURM_ARRAY_TASK_ID": "1",
                         "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_CPUS_PER_TASK": "8"})
    cmd = cli.commands.get(argv[1])
    assert cmd is not None, f"{name}.sbatch runs `curate {argv[1]}`, which is no command"
    opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
    flags = [a for a in argv[2:] if a.startswith("--")]
    assert set(flags) <= opts, f"{name}.sbatch uses flags `curate {argv[1]}` lacks: {set(flags) - opts}"
    if "#SBATCH --array" in (SLURM / f"{name}.sbatch").read_text():
        i = argv.index("--shard-index")
        assert argv[i + 1] == "1" and argv[argv.index("--num-shards") + 1] == "4"


def test_download_plan_job_then_array_indices_as_concurrent_processes(tmp_path):
    """download_plan.sbatch once, then every index of download.sbatch at the same time (as Slurm would)."""
    import os
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.io.tables import read_tables

    # addresses the guard refuses before any connection (no traffic): every row still gets its ledger row
    urls = [f"http://10.{i % 7}.0.{i % 250}/img{i}.jpg" for i in range(40)] + ["http://10.0.0.0/img0.jpg", None]
    inp = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": urls}), inp)
    count = 3
    base = {"URL_LIST": str(inp), "CURATE_ARGS": ""}

    def argv(name: str, env: dict[str, str]) -> list[str]:
        a = expand(command_line(SLURM / f"{name}.sbatch"), env)
        # CURATE_ARGS is word-split by bash, as here
        return [sys.executable, "-m", "curate.cli", *a[1:], "--samples-per-shard", "6", "--no-progress"]

    for out in ("local", "array"):
        (tmp_path / out).mkdir()
    assert main(["download", str(inp), "--out", str(tmp_path / "local"), "--samples-per-shard", "6",
                 "--no-progress"]) == 0
    env = {**base, "DATASET": str(tmp_path / "array")}
    assert subprocess.run(argv("download_plan", env)).returncode == 0
    procs = [subprocess.Popen(argv("download", {**env, "SLURM_ARRAY_TASK_ID": str(i),
                                                "SLURM_ARRAY_TASK_COUNT": str(count), "SLURM_CPUS_PER_TASK": "1"}),
                              env={**os.environ, "SLURM_ARRAY_TASK_ID": str(i)}) for i in range(count)]
    assert [p.wait(timeout=120) for p in procs] == [0] * count
    local = read_tables(sorted((tmp_path / "local" / "ledger").glob("*.parquet"))).drop(["elapsed"])
    array = read_tables(sorted((tmp_path / "array" / "ledger").glob("*.parquet"))).drop(["elapsed"])
    assert local.num_rows == 42 and local.equals(array)
    assert sorted(local.column("status").to_pylist()).count("blocked_address") == 40


@pytest.mark.slow  # three CLI processes that each load torch and open_clip
def test_score_array_indices_as_concurrent_processes_and_a_killed_run_equal_a_local_run(tiny_model, tmp_path):
    """score.sbatch's command for every index at once (as Slurm would), and a run SIGKILLed once its first
    shard is done then rerun, both write exactly the local run's tables and embeddings."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import numpy as np
    import pyarrow.parquet as pq
    from dataset_factory import color_image, make_dataset
    from test_score import CAPTIONS

    cfg = tiny_model
    rows = [(color_image(i), CAPTIONS[i % 4], "success") for i in range(12)]
    extra = ["--device", "cpu", "--model", str(cfg), "--pretrained", "none", "--batch-size", "2", "--no-progress"]
    local = make_dataset(tmp_path / "local", rows, shard_size=2)
    assert main(["score", str(local.root), *extra]) == 0

    array = make_dataset(tmp_path / "array", rows, shard_size=2)
    count = 3
    procs = []
    for i in range(count):
        env = {"DATASET": str(array.root), "SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_COUNT": str(count)}
        argv = expand(command_line(SLURM / "score.sbatch"), env)
        procs.append(subprocess.Popen([sys.executable, "-m", "curate.cli", *argv[1:], *extra]))
    assert [p.wait(timeout=300) for p in procs] == [0] * count

    killed = make_dataset(tmp_path / "killed", rows, shard_size=2)
    proc = subprocess.Popen([sys.executable, "-m", "curate.cli", "score", str(killed.root), *extra],
                            start_new_session=True)
    markers = killed.root / "_done" / "score"
    t0 = time.time()
    while time.time() - t0 < 240 and proc.poll() is None and not list(markers.glob("*.json")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    while time.time() - t0 < 260:  # its loader workers hold the lock's file until the kernel has reaped them
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    assert main(["score", str(killed.root), *extra]) == 0

    assert len(local.shards()) == 6
    for ds in (array, killed):
        for s in local.shards():
            assert np.array_equal(np.load(ds.signals("score", s, ".img_emb.npy")),
                                  np.load(local.signals("score", s, ".img_emb.npy")))
            assert pq.read_table(ds.signals("score", s)).to_pylist() == pq.read_table(local.signals("score", s)).to_pylist()
        assert not list(ds.root.rglob(".tmp-*"))


def test_adopt_template_adopts_an_img2dataset_folder_like_a_plain_run(tmp_path):
    """adopt.sbatch's exact command (one job; its workers are the task's CPUs) equals `curate adopt` run here."""
    import pyarrow.parquet as pq
    from test_adopt import write_i2d_shard

    src = tmp_path / "i2d"
    for s in range(2):
        write_i2d_shard(src, f"{s:05d}", n_ok=4, seed=s)
    assert main(["adopt", str(src), "--out", str(tmp_path / "plain")]) == 0
    argv = expand(command_line(SLURM / "adopt.sbatch"),
                  {"SRC": str(src), "OUT": str(tmp_path / "job"), "SLURM_CPUS_PER_TASK": "2"})
    assert argv[:2] == ["curate", "adopt"] and argv[argv.index("--workers") + 1] == "2"
    assert main(argv[1:]) == 0
    for sub in ("ledger", "shards"):
        names = sorted(p.name for p in (tmp_path / "plain" / sub).iterdir())
        assert names and sorted(p.name for p in (tmp_path / "job" / sub).iterdir()) == names
    plain, job = (pq.read_table(tmp_path / d / "ledger").to_pylist() for d in ("plain", "job"))
    assert len(job) == 2 * (4 + 6) and job == plain


@pytest.mark.parametrize("name", ["score", "dedup"])
def test_gpu_templates_request_gpus_per_task(name):
    """The GPU stages' templates ask Slurm for GPUs per task (so each array task owns its GPU, and `--device
    cuda` with N GPUs per task runs one local worker per GPU) and cores beside it for the loader workers."""
    text = (SLURM / f"{name}.sbatch").read_text()
    sbatch = dict(ln[len("#SBATCH "):].partition("=")[::2] for ln in text.splitlines() if ln.startswith("#SBATCH --"))
    assert sbatch.get("--ntasks") == "1" and int(sbatch["--gpus-per-task"]) >= 1
    assert int(sbatch["--cpus-per-task"]) >= 2 + 1  # the task process, the pin-memory thread, a loader worker
    argv = expand(command_line(SLURM / f"{name}.sbatch"), {"DATASET": "/d", "SLURM_ARRAY_TASK_ID": "0",
                                                           "SLURM_ARRAY_TASK_COUNT": "2"})
    device = argv[argv.index("--device") + 1] if "--device" in argv else "auto"
    assert device in ("cuda", "auto")  # auto takes the GPU where torch sees one
