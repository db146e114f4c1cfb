"""Adding a stage is one module plus one registry line: tests/wordcount_stage.py, registered here through the
public `curate.stages.register`, plans, runs, resumes, follows its upstream, is listed by `curate --help`, is
checked in pipeline YAML and appears in the options reference, with no other file touched."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from dataset_factory import color_image, make_dataset

import curate
from curate import stages
from curate.cli import main
from curate.commands import reference
from curate.errors import ConfigMismatchError, InputError
from curate.pipeline import plan

CAPTIONS = ["a red fox", "cat", None, "two words", "one more caption here", "", "x y z", "dog"]


@pytest.fixture
def wordcount():
    stages.register("wordcount", "wordcount_stage:STAGE", help="Count the words of every caption (a test stage).")
    yield
    stages.unregister("wordcount")


def test_a_registered_stage_plans_runs_and_resumes(wordcount, tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds", [(color_image(i), c, "success") for i, c in enumerate(CAPTIONS)],
                      shard_size=3)
    assert main(["--help"]) == 0
    assert "wordcount" in capsys.readouterr().out
    assert main(["wordcount", "--help"]) == 0
    assert "--min-words" in capsys.readouterr().out

    assert main(["wordcount", str(ds.root), "--no-progress"]) == 0
    got = {}
    for shard in ds.shards():
        got.update({r["key"]: (r["words"], r["short"]) for r in pq.read_table(ds.signals("wordcount", shard)).to_pylist()})
    words = [3, 1, 0, 2, 4, 0, 3, 1]
    assert [got[k] for k in sorted(got)] == [(w, w < 2) for w in words]
    entry = json.loads((ds.root / "manifest.json").read_text())["stages"]["wordcount"]
    assert entry["status"] == "complete" and entry["counts"] == {"rows": 8, "short": 4}
    assert entry["engine"] == "local"

    # its signal table joins the samples view at once: export can select on it
    capsys.readouterr()
    assert main(["export", str(ds.root), "--out", str(tmp_path / "out"), "--where", "NOT wordcount_short",
                 "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split() == ["kept", "4"]

    # the Python API goes through the same runner: everything is done already
    s = curate.run_stage("wordcount", ds.root)
    assert (s.shards_total, s.shards_skipped, s.shards_done) == (3, 3, 0)

    # another config is refused (exit 2) until --redo; the fingerprint is the runner's, whoever calls
    assert main(["wordcount", str(ds.root), "--min-words", "4", "--no-progress"]) == 2
    with pytest.raises(ConfigMismatchError):
        curate.run_stage("wordcount", ds.root, min_words=4)
    assert main(["wordcount", str(ds.root), "--min-words", "4", "--redo", "--no-progress"]) == 0
    assert json.loads((ds.root / "manifest.json").read_text())["stages"]["wordcount"]["counts"]["short"] == 7

    # a shard downloaded again: only its task runs again (the stage's `reads`)
    upstream = ds.marker("download", ds.shards()[1])
    upstream.write_text(json.dumps({**json.loads(upstream.read_text()), "run": "again"}))
    s = curate.run_stage("wordcount", ds.root, min_words=4)
    assert (s.shards_done, s.shards_skipped) == (1, 2)


def test_a_registered_stage_is_checked_in_yaml_and_documented(wordcount, tmp_path):
    steps = {"name": "t", "workdir": str(tmp_path), "stages": [
        {"stage": "wordcount", "args": ["ds"], "min_words": 3, "workers": 2}]}
    assert plan(steps)[0].argv[:4] == ["wordcount", "--min-words", "3", "--workers"]
    steps["stages"][0]["min_words"] = "three"
    with pytest.raises(InputError, match="field 'min_words' must be an integer"):
        plan(steps)
    steps["stages"][0] = {"stage": "wordcount", "args": ["ds"], "max_words": 3}
    with pytest.raises(InputError, match=r"unknown field\(s\) max_words"):
        plan(steps)

    out = tmp_path / "OPTIONS.md"
    assert reference.main([str(out)]) == 0
    text = out.read_text()
    assert "## curate wordcount" in text and "Count the words of every caption" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| `--min-words`"))
    assert "`WordCountConfig.min_words`" in line and "`2`" in line


def test_an_unregistered_stage_is_gone(tmp_path, capsys):
    assert main(["--help"]) == 0
    assert "wordcount" not in capsys.readouterr().out
    with pytest.raises(KeyError, match="unknown stage 'wordcount'"):
        stages.get_stage("wordcount")
