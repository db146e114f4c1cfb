"""Pipelines' named services and datasets (curate.services): the demo's web and splits come in through them,
and any pipeline can declare its own."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curate.cli import main
from curate.errors import InputError
from curate.pipeline import load, plan

REPO = Path(__file__).resolve().parents[1]
STARTED: list[str] = []


@contextlib.contextmanager
def marker_service(settings, state_dir):
    """A test service kind (module:function): writes a file while it runs and removes it when stopped."""
    state_dir.mkdir(parents=True, exist_ok=True)
    flag = state_dir / "running"
    flag.write_text(json.dumps(settings))
    STARTED.append(str(state_dir))
    try:
        yield {"flag": str(flag), "greeting": settings.get("greeting", "hi")}
    finally:
        flag.unlink()


def test_a_small_demo_pipeline_runs_with_its_web_service_and_split_dataset(tmp_path, capsys):
    """The demo's mechanism end to end on a small config: the demo web (40 rows, no slow faults) feeds
    download, the eval split is written as a named dataset, and a user-declared service runs beside them."""
    with socket.socket() as sock:  # a fixed port: the URLs (and so download's fingerprint) hold it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    p = tmp_path / "mini.yaml"
    p.write_text(f"""
name: mini
workdir: {tmp_path / 'work'}
services:
  web: {{kind: demo-web, seed: 3, n: 40, faults: ["404", html], slow_seconds: 1, port: {port}}}
  side: {{kind: "test_pipeline_services:marker_service", greeting: hello}}
datasets:
  eval: {{kind: demo-split, split: eval, samples_per_shard: 500}}
  pool: ${{workdir}}/pool
stages:
  - stage: download
    args: ["${{services.web.url_list}}"]
    out: ${{datasets.pool}}
    url_col: URL
    caption_col: TEXT
    allow_host: ${{services.web.allow_hosts}}
    image_size: 64
    samples_per_shard: 1000
    timeout: 3
    workers: 1
  - stage: inspect
    args: ["${{datasets.eval}}"]
  - stage: inspect
    id: side
    args: ["${{datasets.pool}}"]
    json: true
""")
    STARTED.clear()
    assert main(["run", str(p)]) == 0
    work = tmp_path / "work"
    ledger = pq.read_table(work / "pool" / "ledger")
    assert ledger.num_rows >= 40 and "success" in ledger.column("status").to_pylist()
    assert (work / "web" / "urls.parquet").exists()  # the service's state under ${workdir}/NAME
    assert pq.read_table(work / "eval" / "ledger").num_rows == 753
    assert STARTED == [str(work / "side")] and not (work / "side" / "running").exists()  # stopped after
    capsys.readouterr()
    # a rerun resumes: the eval dataset is left as it is and download has nothing to do
    before = sorted(q.stat().st_mtime_ns for q in (work / "eval" / "shards").iterdir())
    assert main(["run", str(p)]) == 0
    assert sorted(q.stat().st_mtime_ns for q in (work / "eval" / "shards").iterdir()) == before


def test_dry_run_shows_service_placeholders_and_starts_nothing(tmp_path, capsys):
    data_dir = tmp_path / "w"
    p = tmp_path / "d.yaml"
    p.write_text(f"""
workdir: {data_dir}
services:
  side: {{kind: "test_pipeline_services:marker_service"}}
  web: {{kind: demo-web}}
datasets:
  eval: {{kind: demo-split, split: eval}}
stages:
  - stage: inspect
    args: ["${{services.web.url_list}}", "${{datasets.eval}}"]
""")
    STARTED.clear()
    assert main(["run", str(p), "--dry-run", "--set", "services.web.seed=4"]) == 0
    out = capsys.readouterr().out
    assert f"curate inspect -- '<services.web.url_list>' {data_dir}/eval" in out
    assert STARTED == [] and not data_dir.exists()
    assert load(p, ("services.web.seed=4",))["services"]["web"]["seed"] == 4


@pytest.mark.parametrize("body, message", [
    ("services: {web: {seed: 0}}", "services.web must be a mapping with a 'kind'"),
    ("services: {web: {kind: nope}}", "unknown service kind 'nope'; known: demo-web"),
    ("datasets: {e: {kind: nope}}", "unknown dataset kind 'nope'; known: demo-split"),
    ("datasets: {e: [1]}", "datasets.e must be a path or a mapping with a 'kind'"),
    ("demo_web: {seed: 0}", "unknown field(s) demo_web"),
])
def test_bad_services_and_datasets_are_input_errors(tmp_path, body, message):
    p = tmp_path / "bad.yaml"
    p.write_text(f"{body}\nstages:\n  - stage: inspect\n    args: [x]\n")
    with pytest.raises(InputError, match=re.escape(message)):
        plan(load(p))


def test_unknown_service_setting_is_an_exit_2_naming_it(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text(f"workdir: {tmp_path / 'w'}\nservices: {{web: {{kind: demo-web, sead: 1}}}}\n"
                 "stages:\n  - stage: inspect\n    args: ['${services.web.url_list}']\n")
    assert main(["run", str(p)]) == 2
    assert "sead" in capsys.readouterr().err


def test_the_pipeline_module_does_not_import_the_demo():
    code = ("import sys; import curate.pipeline as p; p.plan(p.load(sys.argv[1]));"
            "print(sorted(m for m in sys.modules if m.startswith('curate.demo')))")
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "pipelines" / "demo.yaml")], capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
