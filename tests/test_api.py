"""The Python API (`curate.Pipeline`): download -> score -> dedup -> export on a loopback web, a second call
resumes, and the CLI and a pipeline YAML over the same options see the same fingerprints (they resume too)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from loopback import LoopServer
from pipeline_data import N_ROWS, _serve, caption_of

import curate
from curate.cli import main
from curate.errors import ConfigMismatchError, InputError


def stages(urls: Path, ds: Path, cur: Path, model: Path, endpoint: str) -> list[tuple[str, list, dict]]:
    """(stage, arguments, fields): the one description the API, the CLI and the YAML below all run."""
    return [
        ("download", [urls], {"out": ds, "url_col": "URL", "caption_col": "TEXT", "allow_host": [endpoint],
                              "samples_per_shard": 8, "resize_mode": "no", "timeout": 2, "deadline": 4}),
        ("score", [ds], {"model": model, "pretrained": "none", "batch_size": 16, "loader_workers": 0}),
        ("dedup", [ds], {"device": "cpu", "threshold": 0.9999}),
        ("export", [ds], {"out": cur, "policy": ["dedup"], "samples_per_shard": 10}),
    ]


@pytest.fixture
def web(tmp_path):
    server = LoopServer()
    urls = _serve(server)
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": [caption_of(r) for r in range(N_ROWS)]}), path)
    yield server, path
    server.close()


def test_pipeline_runs_the_stages_and_resumes(tmp_path, web, tiny_model):
    server, urls = web
    ds, cur = tmp_path / "ds", tmp_path / "curated"
    plan = stages(urls, ds, cur, tiny_model, server.endpoint)
    p = curate.Pipeline(workers=1)
    first = [p.stage(name, *args, **fields) for name, args, fields in plan]
    for (name, _, _), s in zip(plan, first, strict=True):
        assert s.ok and s.shards_total > 0 and s.shards_done == s.shards_total and s.shards_skipped == 0, (name, s)
    assert first[0].counts["rows"] == N_ROWS
    kept = pq.read_table(cur / "ledger").to_pylist()
    assert 0 < len(kept) < N_ROWS and not any(r.get("is_duplicate") for r in kept)
    assert sorted(p.name for p in (cur / "shards").glob("*.tar"))

    # the same calls again: every stage resumes, nothing is redone
    again = [p.stage(name, *args, **fields) for name, args, fields in plan]
    for (name, _, _), s, s0 in zip(plan, again, first, strict=True):
        assert s.shards_done == 0 and s.shards_skipped == s.shards_total == s0.shards_total, (name, s)
        assert s.fingerprint == s0.fingerprint

    # the attribute form is the same call
    assert p.dedup(ds, device="cpu", threshold=0.9999).shards_done == 0

    # another config is refused, as on the command line; redo=True recomputes
    with pytest.raises(ConfigMismatchError):
        p.dedup(ds, device="cpu", threshold=0.99)
    redone = curate.Pipeline(workers=1, redo=True).dedup(ds, device="cpu", threshold=0.99)
    assert redone.shards_done == redone.shards_total > 0


def test_cli_and_yaml_share_the_api_fingerprints(tmp_path, web, tiny_model):
    """What the API wrote, the CLI and `curate run` resume: the same options give the same fingerprints."""
    server, urls = web
    ds, cur = tmp_path / "ds", tmp_path / "curated"
    plan = stages(urls, ds, cur, tiny_model, server.endpoint)
    p = curate.Pipeline(workers=1)
    for name, args, fields in plan:
        p.stage(name, *args, **fields)
    # the CLI: the same command lines the API ran (Pipeline.argv shows them)
    for name, args, fields in plan:
        argv = p.argv(name, *args, **fields)
        assert argv[0] == name
        assert main(argv) == 0
    # pipeline YAML: the same fields
    doc = {"name": "api-same", "workdir": str(tmp_path / "work"), "defaults": {"workers": 1, "progress": False},
           "stages": [{"stage": name, "args": [str(a) for a in args],
                       **{k: ([str(x) for x in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v)
                          for k, v in fields.items()}} for name, args, fields in plan]}
    yml = tmp_path / "same.yaml"
    yml.write_text(yaml.safe_dump(doc))
    summaries = curate.run_yaml(yml)
    assert [s.stage for s in summaries] == ["download", "score", "dedup", "export"]
    assert all(s.shards_done == 0 and s.shards_skipped == s.shards_total > 0 for s in summaries), summaries


def test_run_stage_checks_fields_like_the_yaml(tmp_path):
    with pytest.raises(InputError, match="unknown field"):
        curate.run_stage("dedup", tmp_path, no_such_option=1)
    with pytest.raises(InputError, match="keep"):
        curate.run_stage("dedup", tmp_path, keep="largest")
    with pytest.raises(AttributeError, match="no stage"):
        curate.Pipeline().no_such_stage  # noqa: B018
    assert curate.Pipeline().argv("export", tmp_path, out=tmp_path / "o", policy=["dedup", "laion"],
                                  write_dropped=True) == \
        ["export", "--out", str(tmp_path / "o"), "--policy", "dedup", "--policy", "laion", "--write-dropped",
         "--", str(tmp_path)]

