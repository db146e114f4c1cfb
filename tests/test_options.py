"""One declaration per option: a config field gives the flag, the pipeline YAML check and the reference entry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from curate.cli import cli, main
from curate.commands import download
from curate.config import fingerprint
from curate.errors import InputError
from curate.options import REFERENCE, ConfigCommand, DeclaredOption, check_step, option, reference_markdown
from curate.pipeline import plan
from curate.search.build import IndexConfig
from curate.stages.dedup import DedupConfig
from curate.stages.download import DownloadConfig
from curate.stages.export import ExportConfig
from curate.stages.score import ScoreConfig
from curate.stages.target import TargetConfig
from curate.train_probe.run import ProbeConfig
from curate.train_probe.train import TrainConfig


@dataclass(frozen=True)
class CaptionRuleConfig(DownloadConfig):
    """A test-only download config with one option more."""

    min_caption_words: int = option(0, help="Captions with fewer words than this are marked short.")


def _pipeline(tmp_path: Path, step: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(f"name: t\nworkdir: {tmp_path / 'w'}\nstages:\n  - stage: download\n    args: [urls.csv]\n"
                 f"    out: {tmp_path / 'ds'}\n{step}")
    return p


def test_a_subclass_field_is_a_flag_a_yaml_key_and_a_reference_entry(tmp_path, monkeypatch, capsys):
    cmd = download.command.with_config(CaptionRuleConfig)

    # --help of the generated command shows the new option with its help and default
    out = CliRunner().invoke(cmd, ["--help"], terminal_width=200).output
    assert "--min-caption-words INTEGER" in out and "Captions with fewer words" in out and "[default: 0]" in out
    assert "--min-caption-words" not in CliRunner().invoke(download.command, ["--help"]).output

    # the parsed command line builds the subclass, the value type-checked by the declared type
    ctx = cmd.make_context("download", ["urls.csv", "--out", "ds", "--min-caption-words", "3", "--threads", "2"])
    cfg = cmd.collect(ctx).build(input="urls.csv")
    assert type(cfg) is CaptionRuleConfig and cfg.min_caption_words == 3 and cfg.threads == 2
    with pytest.raises(click.BadParameter, match="not a valid integer"):
        cmd.make_context("download", ["urls.csv", "--out", "ds", "--min-caption-words", "three"])

    # the pipeline YAML accepts it under its key, as the flag, and refuses a wrong type naming key and step
    monkeypatch.setitem(cli.commands, "download", cmd)
    ok = {"name": "t", "workdir": str(tmp_path), "stages": [
        {"stage": "download", "args": ["urls.csv"], "out": "ds", "min_caption_words": 3}]}
    assert plan(ok)[0].argv[-4:-2] == ["--min-caption-words", "3"]
    assert main(["run", str(_pipeline(tmp_path, "    min_caption_words: three\n")), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "stages[0] (download)" in err and "field 'min_caption_words' must be an integer" in err

    # the options reference documents it, with the config field it sets
    ref = reference_markdown({"download": cmd})
    line = next(ln for ln in ref.splitlines() if ln.startswith("| `--min-caption-words`"))
    assert "`min_caption_words`" in line and "`0`" in line and "CaptionRuleConfig.min_caption_words" in line
    assert "Captions with fewer words" in line


def test_the_committed_reference_is_up_to_date():
    assert REFERENCE.read_text(encoding="utf-8") == reference_markdown(cli.commands), \
        "docs/OPTIONS.md is stale: run `python -m curate.commands.reference`"


@pytest.mark.parametrize("field, value, message", [
    ("imag_size", 64, "unknown field(s) imag_size"),
    ("image_size", "big", "field 'image_size' must be an integer, not 'big'"),
    ("image_size", True, "field 'image_size' must be an integer"),
    ("max_aspect_ratio", "wide", "field 'max_aspect_ratio' must be a number"),
    ("allow_private", "yes", "field 'allow_private' must be true or false"),
    ("resize_mode", "stretch", "field 'resize_mode': 'stretch' is not one of no, border, keep_ratio"),
    ("keep_col", [["a"]], "field 'keep_col' must be a string or a list of them"),
    ("input_format", "xml", "'xml' is not one of auto, parquet"),
    ("workers", "two", "field 'workers' must be an integer"),  # an engine option: checked by its click type
    ("preset", "yfcc", "'yfcc' is not one of laion, cc3m"),  # a command-only option with choices
])
def test_yaml_fields_are_checked_against_the_declarations(field, value, message):
    where = "pipeline t: stages[0] (download)"
    with pytest.raises(InputError) as e:
        check_step(cli.commands["download"], {"stage": "download", "args": ["u"], field: value}, where)
    assert str(e.value).startswith(where) and message in str(e.value)


def test_yaml_values_that_fit_pass():
    check_step(cli.commands["download"], {
        "stage": "download", "id": "d", "args": ["u"], "out": "o", "image_size": 64, "max_aspect_ratio": 3,
        "keep_col": ["a", "b"], "allow_host": "127.0.0.1:80", "caption_col": None, "allow_private": True,
        "threads": "${env.THREADS}", "url_col": 7, "resize_mode": "center_crop", "progress": False}, "w")


def test_a_preset_fills_only_the_fields_not_given(tmp_path):
    src = tmp_path / "urls.csv"
    src.write_text("link,TEXT\nhttp://127.0.0.1:9/a.jpg,a cat\n")
    # laion's URL column is 'URL'; the explicit --url-col wins, the caption column comes from the preset
    assert main(["download", str(src), "--out", str(tmp_path / "ds"), "--preset", "laion", "--url-col", "link",
                 "--plan-only", "--no-progress"]) == 0
    config = json.loads((tmp_path / "ds" / "manifest.json").read_text())["stages"]["download"]["config"]
    assert (config["url_col"], config["caption_col"]) == ("link", "TEXT")
    assert main(["download", str(src), "--out", str(tmp_path / "ds2"), "--preset", "laion", "--plan-only"]) == 2


def test_deny_domain_files_and_repeated_keep_cols_are_converted(tmp_path):
    (tmp_path / "deny.txt").write_text("Bad.example.  # a comment\n\nworse.example\n")
    cmd = download.command
    ctx = cmd.make_context("download", ["u", "--out", "o", "--deny-domain", f"@{tmp_path / 'deny.txt'}",
                                        "--deny-domain", "x.example", "--keep-col", "b", "--keep-col", "a",
                                        "--keep-col", "b"])
    opts = cmd.collect(ctx)
    assert opts["deny_domains"] == ("bad.example", "worse.example", "x.example")
    assert opts["keep_cols"] == ("b", "a") and opts.explicit >= {"deny_domains", "keep_cols"}
    assert "threads" not in opts.explicit


@pytest.mark.parametrize("make, expected", [
    (lambda: DownloadConfig(input="/x", url_col="URL", keep_cols=("a",), threads=3, deny_domains=("b.com",),
                            allow_hosts=("127.0.0.1:5",)), "231d9fe006c39e35"),
    (lambda: ScoreConfig(model="/m.json", pretrained="none", checksum="ab", precision="bf16",
                         save_text_embeddings=True, threads=3), "512566f4880ccc0e"),
    # + phash_distance (-1 was its default before the pixel check became the default), + pairs_per_row
    (lambda: DedupConfig(threshold=0.9, k=5, against="/a", phash=True, threshold_auto=True, auto_target=0.9,
                         device="cpu", phash_distance=-1), "40bcdaaf101b423e"),
    (lambda: ExportConfig(source="/s", where=("a",), policy=("dedup",), top_fraction=0.5, by="x",
                          layout="img2dataset"), "200ff4fbddaa655f"),
    (lambda: ProbeConfig(subsets=(("a", "/b"),), eval_dir="/e", budgets=(1, 2)), "cc3a69e1b8f13ced"),
    # new output fields (jitter, caption_augment, caption_inflect): the probe's own fingerprint leaves them out at
    # their defaults (test_train_probe.py::test_new_train_options_at_their_defaults_keep_old_fingerprints)
    (lambda: TrainConfig(lr=0.5), "1219289f3de4603d"),
    (lambda: IndexConfig(kind="flat", memory_budget=5), "92239c4d2aa68e49"),
    (lambda: TargetConfig(target="/t", k=3), "a79848634e9d855a"),
])
def test_fingerprints_are_those_of_the_configs_before_the_declarations(make, expected):
    """Declaring the options (and splitting DownloadConfig into groups) changed no fingerprint, so datasets
    made before resume. A new output field changes them on purpose: then update the hash here."""
    assert fingerprint(make()) == expected


def test_no_command_declares_a_flag_twice():
    for name, cmd in cli.commands.items():
        opts = [o for p in cmd.params for o in (*p.opts, *getattr(p, "secondary_opts", ()))]
        assert len(opts) == len(set(opts)), name
        if isinstance(cmd, ConfigCommand):
            assert "options" not in {p.name for p in cmd.params}
            assert all(p.help for p in cmd.params if isinstance(p, DeclaredOption)), name


def test_false_turns_an_on_by_default_flag_off_in_a_pipeline(tmp_path):
    data = {"name": "t", "workdir": str(tmp_path), "stages": [
        {"stage": "download", "args": ["u"], "out": "o", "progress": False, "allow_private": False},
        {"stage": "train-probe", "eval": "e", "out": "p", "augment": False, "subset": ["a=b"]}]}
    download_step, probe_step = plan(data)
    assert "--no-progress" in download_step.argv and "--allow-private" not in download_step.argv
    assert "--no-augment" in probe_step.argv


def test_dedup_threshold_is_one_declared_option_for_a_cosine_or_auto(tmp_path):
    cmd = cli.commands["dedup"]
    assert [p.declaration.name for p in cmd.params if isinstance(p, DeclaredOption)][0] == "threshold"

    def built(*argv):
        return cmd.collect(cmd.make_context("dedup", [str(tmp_path), *argv])).build()

    assert (built().threshold, built().threshold_auto) == (0.95, False)
    assert (built("--threshold", "0.9").threshold, built("--threshold", "0.9").threshold_auto) == (0.9, False)
    auto = built("--threshold", "AUTO")
    assert (auto.threshold, auto.threshold_auto) == (0.95, True) and auto == DedupConfig(threshold="auto")
    with pytest.raises(click.BadParameter, match="not 'auto' or a cosine"):
        built("--threshold", "high")
    check_step(cmd, {"threshold": "auto"}, "w")
    check_step(cmd, {"threshold": 0.9}, "w")
    with pytest.raises(InputError, match="field 'threshold' must be a string"):
        check_step(cmd, {"threshold": True}, "w")
