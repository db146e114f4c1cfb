"""curate run: YAML stages become CLI calls, run in order, resume, refuse another config; --dry-run, --set."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curate.cli import main
from curate.errors import InputError
from curate.pipeline import load, plan

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path, source, extra=""):
    p = tmp_path / "p.yaml"
    p.write_text(f"""
name: two-exports
workdir: {tmp_path / 'work'}
stages:
  - stage: export
    id: basic
    args: ["{source}"]
    out: ${{workdir}}/basic
    policy: [datacomp-basic]
    samples_per_shard: 4
    write_dropped: true
  - stage: export
    id: top
    args: ["${{workdir}}/basic"]
    out: ${{workdir}}/top
    top_fraction: 0.5
    by: clip_score
{extra}""")
    return p


def test_pipeline_runs_stages_in_order_like_the_cli_and_resumes(pipeline_dataset, tmp_path, capsys):
    source = pipeline_dataset  # read-only: the pipeline writes under tmp_path
    p = _write(tmp_path, source)
    assert main(["run", str(p)]) == 0
    work = tmp_path / "work"
    # the same commands by hand give the same output
    assert main(["export", str(source), "--out", str(tmp_path / "hand"), "--policy", "datacomp-basic",
                 "--samples-per-shard", "4", "--write-dropped"]) == 0
    assert pq.read_table(work / "basic" / "ledger").equals(pq.read_table(tmp_path / "hand" / "ledger"))
    assert (work / "basic" / "dropped.parquet").exists()
    n_basic = pq.read_table(work / "basic" / "ledger").num_rows
    assert pq.read_table(work / "top" / "ledger").num_rows == int(0.5 * n_basic + 0.5)
    capsys.readouterr()
    assert main(["run", str(p)]) == 0  # resume: nothing left to do
    assert capsys.readouterr().err.count("0 shard(s) done") == 2
    # another config for a stage is refused, and the pipeline stops there with that exit code
    assert main(["run", str(p), "--set", "top.top_fraction=0.25"]) == 2
    err = capsys.readouterr().err
    assert "fingerprint" in err and "[2] top" in err
    assert main(["run", str(p), "--set", "top.top_fraction=0.25", "--redo"]) == 0
    assert pq.read_table(work / "top" / "ledger").num_rows == int(0.25 * n_basic + 0.5)


def test_dry_run_prints_the_resolved_commands(tmp_path, capsys):
    p = _write(tmp_path, tmp_path / "src")
    assert main(["run", str(p), "--dry-run", "--set", "basic.samples_per_shard=9", "--engine", "spark"]) == 0
    out = capsys.readouterr().out
    work = tmp_path / "work"
    assert f"curate export --out {work}/basic --policy datacomp-basic --samples-per-shard 9 --write-dropped " \
           f"--engine spark -- {tmp_path}/src" in out
    assert f"--top-fraction 0.5 --by clip_score --engine spark -- {work}/basic" in out
    assert not work.exists()


def test_bad_pipelines_are_input_errors(tmp_path, capsys):
    p = _write(tmp_path, tmp_path / "src", "  - stage: export\n    args: [x]\n    out: y\n    polcy: [dedup]\n")
    assert main(["run", str(p), "--dry-run"]) == 2
    assert "polcy" in capsys.readouterr().err
    with pytest.raises(InputError, match="no stage with id or name 'nope'"):
        load(_write(tmp_path, "s"), ("nope.x=1",))
    with pytest.raises(InputError, match=r"unknown variable \$\{oops\}"):
        plan({"name": "x", "workdir": "w", "stages": [{"stage": "export", "args": ["${oops}"], "out": "o"}]})
    (tmp_path / "bad.yaml").write_text("stages: 3\n")
    assert main(["run", str(tmp_path / "bad.yaml")]) == 2


@pytest.mark.parametrize("name", ["demo", "laion", "datacomp-basic"])
def test_shipped_pipelines_resolve(name, capsys):
    assert main(["run", str(REPO / "pipelines" / f"{name}.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "curate export" in out and "curate score" in out and "curate download" in out


def test_demo_pipeline_wires_the_demo_web_into_download():
    data = load(REPO / "pipelines" / "demo.yaml")
    steps = plan(data, variables={"services.web.url_list": "/w/urls.parquet",
                                  "services.web.ground_truth": "/w/gt.parquet",
                                  "services.web.allow_hosts": ["127.0.0.1:4001", "127.0.0.1:4002"]})
    download = next(s for s in steps if s.stage == "download")
    assert download.argv[-1] == "/w/urls.parquet"
    assert download.argv.count("--allow-host") == 2 and "127.0.0.1:4002" in download.argv
    assert [s.stage for s in steps] == ["download", "train-probe", "score", "score", "dedup", "export", "train-probe",
                                        "export", "balance", "export", "train-probe", "report"]
    # the curated export keeps the fraction the study (a train-probe with --budgets) recommends at the probe's budget
    study, curated, probe = (next(s for s in steps if s.label == name) for name in ("study", "export", "probe"))
    assert "--budgets" in study.argv and study.argv[study.argv.index("--seeds") + 1] == "3"
    assert curated.argv[curated.argv.index("--top-fraction") + 1] == "auto"
    assert curated.argv[curated.argv.index("--study") + 1] == study.argv[study.argv.index("--out") + 1]
    assert curated.argv[curated.argv.index("--budget") + 1] == probe.argv[probe.argv.index("--samples-seen") + 1]
    assert probe.argv[probe.argv.index("--seeds") + 1] == "5"
    # the trusted seed and eval splits are materialised under the workdir and wired into the stages
    probe = next(s for s in steps if s.label == "filter-model")
    assert any(a.endswith("demo-out/demo-seed") for a in probe.argv)
