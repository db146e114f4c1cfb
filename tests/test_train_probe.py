"""train-probe: real open_clip training on tiny synthetic shards, the metrics, resumption and the saved model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from dataset_factory import make_dataset
from PIL import Image

from curate.cli import main
from curate.errors import ConfigMismatchError, InputError
from curate.io.layout import DatasetDir
from curate.io.tables import write_table
from curate.train_probe.data import load_samples
from curate.train_probe.evaluate import evaluate_model, retrieval, zero_shot
from curate.train_probe.run import filter_train_config
from curate.train_probe.train import TrainConfig, batch_indices, batch_plan, saved_model_paths, train_run

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
          "purple": (140, 30, 160), "white": (245, 245, 245)}
FAST = dict(image_size=32, batch_size=8, lr=2e-3, curve_points=2, threads=2)  # 4 image tokens (patch 16): quick steps


def swatch(color: str, i: int) -> Image.Image:
    """A colour swatch with a little per-sample noise, so no two images are identical."""
    rng = np.random.default_rng(i)
    arr = np.clip(np.array(COLORS[color])[None, None, :] + rng.integers(-25, 26, (40, 40, 3)), 0, 255)
    return Image.fromarray(arr.astype("uint8"), "RGB")


def make_colour_dataset(root: Path, n: int, offset: int = 0, labelled: bool = False) -> Path:
    names = list(COLORS)
    colors = [names[(offset + i) % len(names)] for i in range(n)]
    ds = make_dataset(root, [(swatch(c, offset + i), f"a {c} square", "success") for i, c in enumerate(colors)],
                      shard_size=32)
    if labelled:
        add_labels(ds, colors)
    return ds.root


def add_labels(ds: DatasetDir, labels: list[str]) -> None:
    i = 0
    for f in ds.ledger_files():
        t = pq.read_table(f)
        write_table(f, t.append_column("label", pa.array(labels[i:i + t.num_rows])))
        i += t.num_rows


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("probe")
    return {
        "big": make_colour_dataset(d / "big", 48),
        "small": make_colour_dataset(d / "small", 12, offset=200),
        "eval": make_colour_dataset(d / "eval", 36, offset=500, labelled=True),
    }


@pytest.fixture(scope="module")
def tokenizer():
    import open_clip

    from curate.train_probe.train import model_config

    return open_clip.get_tokenizer(model_config(TrainConfig())[0])


# ------------------------------------------------------------------ metrics on known embeddings


def test_zero_shot_is_perfect_when_images_are_their_class_and_chance_on_shuffled_labels():
    g = torch.Generator().manual_seed(0)
    n_cls, per = 20, 50
    classes = torch.nn.functional.normalize(torch.randn(n_cls, 64, generator=g), dim=-1)
    targets = torch.arange(n_cls).repeat_interleave(per)
    images = torch.nn.functional.normalize(classes[targets] + 0.05 * torch.randn(n_cls * per, 64, generator=g), dim=-1)
    m = zero_shot(images, classes, targets)
    assert m["zeroshot_top1"] == 1.0 and m["zeroshot_top5"] == 1.0
    shuffled = targets[torch.randperm(len(targets), generator=g)]
    m = zero_shot(images, classes, shuffled)
    assert abs(m["zeroshot_top1"] - 1 / n_cls) < 0.03  # chance 0.05
    assert abs(m["zeroshot_top5"] - 5 / n_cls) < 0.06  # chance 0.25


def test_retrieval_recall_on_aligned_and_shuffled_pairs():
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(200, 32, generator=g), dim=-1)
    assert retrieval(img, img) == {"i2t_r1": 1.0, "i2t_r5": 1.0, "t2i_r1": 1.0, "t2i_r5": 1.0}
    m = retrieval(img, img[torch.randperm(200, generator=g)])
    assert m["i2t_r1"] < 0.03 and m["t2i_r5"] < 0.08


# ------------------------------------------------------------------ training


def test_batches_see_exactly_n_samples_and_cover_epochs_evenly():
    sizes = batch_plan(100, 16)
    assert sizes == [16] * 6 + [4] and sum(sizes) == 100
    counts = torch.zeros(30, dtype=torch.long)
    for idx in batch_indices(30, sizes, torch.Generator().manual_seed(0)):
        assert len(set(idx.tolist())) == len(idx)  # no sample twice in one batch
        counts += torch.bincount(idx, minlength=30)
    assert counts.sum() == 100 and counts.max() - counts.min() <= 1  # 3.33 epochs, each row 3 or 4 times


def test_training_lowers_the_contrastive_loss_and_is_deterministic(data, tokenizer):
    train = load_samples(data["big"], 32, tokenizer)
    _, a = train_run(train, TrainConfig(samples_seen=8 * 30, **FAST), seed=0)
    assert a["loss_last"] < a["loss_first"] - 0.3, (a["loss_first"], a["loss_last"])
    short = TrainConfig(samples_seen=8 * 3, **FAST)
    _, b = train_run(train, short, seed=0)
    _, b2 = train_run(train, short, seed=0)
    assert b2["loss_last"] == b["loss_last"]  # same seed: same init, data order and flips on CPU
    _, c = train_run(train, short, seed=1)
    assert c["loss_last"] != b["loss_last"]


def test_equal_samples_seen_across_subset_sizes(data, tokenizer):
    cfg = TrainConfig(samples_seen=60, **FAST)
    _, big = train_run(load_samples(data["big"], 32, tokenizer), cfg, seed=0)
    _, small = train_run(load_samples(data["small"], 32, tokenizer), cfg, seed=0)
    assert big["samples_seen"] == small["samples_seen"] == 60 and big["steps"] == small["steps"] == 8
    assert (big["subset_size"], small["subset_size"]) == (48, 12)
    assert big["epochs"] == 1.25 and small["epochs"] == 5.0
    assert (small["repeats_min"], small["repeats_max"]) == (5, 5) and (big["repeats_min"], big["repeats_max"]) == (1, 2)


@pytest.mark.slow
def test_a_trained_model_learns_the_colours(data, tokenizer):
    eval_set = load_samples(data["eval"], 32, tokenizer, flag="--eval", label_column="label")
    assert sorted(set(eval_set.labels)) == sorted(COLORS)
    cfg = TrainConfig(**{**FAST, "batch_size": 16, "samples_seen": 16 * 80, "curve_points": 4})
    model, result = train_run(load_samples(data["big"], 32, tokenizer), cfg,
                              seed=0, evaluate=lambda m, t: evaluate_model(m, t, eval_set, "cpu"))
    assert [p["samples_seen"] for p in result["curve"]] == [320, 640, 960, 1280]
    # six colours named in the captions: a model that learnt anything beats chance (1/6) by far
    assert result["zeroshot_top1"] > 0.5, result
    assert result["i2t_r5"] > 5 / 36


# ------------------------------------------------------------------ the command


def _probe_args(data, out, *extra):
    return ["train-probe", "--subset", f"big={data['big']}", "--subset", f"small={data['small']}",
            "--eval", str(data["eval"]), "--samples-seen", "24", "--out", str(out), "--image-size", "32",
            "--batch-size", "8", "--curve-points", "2", *extra]


def test_command_writes_results_resumes_and_refuses_another_config(data, tmp_path):
    out = tmp_path / "out"
    assert main(_probe_args(data, out, "--seeds", "2")) == 0
    res = json.loads((out / "results.json").read_text())
    assert [(r["subset"], r["seed"]) for r in res["runs"]] == [("big", 0), ("big", 1), ("small", 0), ("small", 1)]
    assert {r["samples_seen"] for r in res["runs"]} == {24}
    summary = {s["subset"]: s for s in res["summary"]}
    assert summary["small"]["epochs"] == 2.0 and summary["big"]["epochs"] == 0.5 and summary["big"]["seeds"] == 2
    for metric in ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "t2i_r5"):  # the summary is over the seeds' runs
        values = [r[metric] for r in res["runs"] if r["subset"] == "big"]
        assert len(values) == 2 and summary["big"][f"{metric}_mean"] == pytest.approx((values[0] + values[1]) / 2)
        assert summary["big"][f"{metric}_std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)  # n - 1 = 1
    assert res["chance"]["zeroshot_top1"] == pytest.approx(1 / 6) and res["chance"]["majority_top1"] == pytest.approx(1 / 6)
    assert "| big | 48 | 2 | 24 |" in (out / "results.md").read_text()
    # results.md is a rendering of results.json; `curate report`'s summary reads the JSON, not the markdown
    from curate.commands.report import one_screen_summary
    from curate.train_probe.report import results_markdown

    assert results_markdown(res) == (out / "results.md").read_text()
    md = (out / "results.md").read_bytes()
    (out / "results.md").unlink()
    text = one_screen_summary({}, str(tmp_path), None, str(out), None)
    assert "== train-probe ==" in text and "| big | 48 | 2 | 24 |" in text
    (out / "results.md").write_bytes(md)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "manifest.json").read_text())["stages"]["train-probe"]["counts"]["trained"] == 4
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}

    assert main(_probe_args(data, out, "--seeds", "2")) == 0  # resumed: nothing retrained
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == before
    assert json.loads((out / "manifest.json").read_text())["stages"]["train-probe"]["counts"]["resumed"] == 4

    with pytest.raises(ConfigMismatchError):
        from curate.train_probe.run import ProbeConfig, parse_subset, run_probe

        run_probe(ProbeConfig(subsets=(parse_subset(f"big={data['big']}"),), eval_dir=str(data["eval"])),
                  TrainConfig(samples_seen=32, **FAST), out)
    assert main(_probe_args(data, out, "--seeds", "2", "--lr", "0.01")) == 2


@pytest.mark.parametrize("args, message", [
    (["--subset", "bad"], "--subset"),
    (["--subset", "x={missing}"], "--subset"),
    (["--subset", "x={big}", "--batch-size", "1"], "--batch-size"),
    (["--subset", "x={big}", "--sweep-source", "{big}"], "--sweep-source"),
    (["--subset", "x={big}", "--sweep", "clip_score=0.5"], "--sweep-source"),  # defaults to x: not scored
    (["--subset", "x={big}", "--sweep", "clip_score=2", "--sweep-source", "{big}"], "--sweep"),
    (["--subset", "x={big}", "--sweep", "clip_score=0.5", "--sweep-source", "{big}"], "--sweep-source"),
    (["--subset", "x={big}", "--model", "no-such-model"], "--model"),
    (["--subset", "x={big}", "--subset", "y={big}", "--save-model", "{tmp}/m.safetensors"], "--save-model"),
])
def test_bad_arguments_exit_2_naming_the_flag(data, tmp_path, capsys, args, message):
    fill = {"big": data["big"], "missing": tmp_path / "missing", "tmp": tmp_path}
    argv = ["train-probe", "--eval", str(data["eval"]), "--out", str(tmp_path / "o")] + [a.format(**fill) for a in args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_eval_without_label_column_is_an_input_error(data, tmp_path):
    from curate.train_probe.run import ProbeConfig, parse_subset, run_probe

    cfg = ProbeConfig(subsets=(parse_subset(f"big={data['big']}"),), eval_dir=str(data["small"]))
    with pytest.raises(InputError, match="--eval: .*ledger.*no 'label' column"):
        run_probe(cfg, TrainConfig(samples_seen=16, **FAST), tmp_path / "o")


# ------------------------------------------------------------------ sweep


def add_scores(root: Path, values: dict[str, float]) -> None:
    """Score signal tables in `curate score`'s schema with planted clip_score values: the sweep's ranking
    and ties need chosen values, which a tiny random model cannot give (other columns stay null)."""
    from curate.io.atomic import write_json
    from curate.stages.score import signal_schema

    ds = DatasetDir.at(root)
    for shard in ds.shards():
        keys = pq.read_table(ds.ledger(shard), columns=["key"]).column("key").to_pylist()
        recs = [{"key": k, "scored": k in values, "clip_score": values.get(k)} for k in keys]
        write_table(ds.signals("score", shard), pa.Table.from_pylist(recs, schema=signal_schema()))
        write_json(ds.marker("score", shard), {"shard": shard, "stats": {}})


def test_sweep_subsets_top_and_random_of_equal_size():
    from curate.train_probe.sweep import SweepSpec, sweep_subsets

    keys = [f"k{i:02d}" for i in range(20)]
    values = [float(i % 10) for i in range(20)]  # ties: k09 and k19 share the top value
    subs = {s["name"]: s for s in sweep_subsets(keys, values, SweepSpec("clip_score", (0.1, 0.5, 1.0)),
                                                available=set(keys) - {"k19"})}
    assert list(subs) == ["top-10%", "random-10%", "top-50%", "random-50%", "all-100%"]
    assert subs["top-10%"]["keys"] == ["k08", "k09"]  # 19 candidates (k19 not in the shards) -> 2; tie by key
    assert subs["top-10%"]["threshold"] == 8.0
    assert len(subs["top-50%"]["keys"]) == len(subs["random-50%"]["keys"]) == 10
    assert subs["random-50%"]["keys"] != subs["top-50%"]["keys"]
    again = sweep_subsets(keys, values, SweepSpec("clip_score", (0.5,)), available=set(keys) - {"k19"})
    assert again[1]["keys"] == subs["random-50%"]["keys"]  # seeded: the same control every time
    assert len(subs["all-100%"]["keys"]) == 19


def test_sweep_command_trains_each_fraction_at_equal_samples_seen(data, tmp_path):
    src = make_colour_dataset(tmp_path / "src", 32, offset=900)
    keys = [k for f in DatasetDir.at(src).ledger_files() for k in pq.read_table(f).column("key").to_pylist()]
    add_scores(src, {k: float(i) for i, k in enumerate(keys)})
    out = tmp_path / "sweep"
    argv = ["train-probe", "--subset", f"whole={src}", "--seeds", "2", "--sweep", "clip_score=0.25,0.5,1",
            "--eval", str(data["eval"]), "--samples-seen", "8", "--batch-size", "8", "--image-size", "32",
            "--curve-points", "1", "--out", str(out)]  # --sweep-source defaults to the first --subset
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    summary = {s["subset"]: s for s in res["summary"]}
    assert {k: v["subset_size"] for k, v in summary.items()} == {
        "whole": 32, "top-25%": 8, "random-25%": 8, "top-50%": 16, "random-50%": 16, "all-100%": 32}
    assert {r["samples_seen"] for r in res["runs"]} == {8}
    # --seeds applies to the sweep points too, so they are compared paired by seed
    assert summary["top-25%"]["seeds"] == 2 and summary["whole"]["seeds"] == 2
    # the 100% point is the --subset over the same dir: its runs are reused, not trained again
    assert summary["all-100%"]["seeds"] == 2
    assert summary["all-100%"]["zeroshot_top1_mean"] == summary["whole"]["zeroshot_top1_mean"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        f"{n}--seed{s}.json" for n in ("random-25pct", "random-50pct", "top-25pct", "top-50pct", "whole") for s in (0, 1))
    pairs = {(c["subset"], c["baseline"], c["metric"]): c for c in res["comparisons"]}
    assert set(pairs) == {(t, b, m) for t, f in (("top-25%", "25%"), ("top-50%", "50%"))
                          for b in (f"random-{f}", "all-100%") for m in ("retrieval_r5", "zeroshot_balanced")}
    c = pairs[("top-25%", "random-25%", "retrieval_r5")]
    assert c["seeds"] == 2 and c["items"] == 36 and c["ci"][0] <= c["difference"] <= c["ci"][1]
    assert "distinguishable from zero" in c["verdict"]
    assert res["headline"]["metric"] == "retrieval_r5"
    top = {s["subset"]: s for s in res["subsets"]}["top-25%"]
    assert top["threshold"] == 24.0 and top["selected"] == 8
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ saved model -> curate score


def test_saved_model_loads_in_curate_score_with_the_same_embeddings(data, tokenizer, tmp_path):
    from curate.models import build_model, resolve_model
    from curate.train_probe.evaluate import encode_images, encode_texts

    argv = ["train-probe", "--subset", f"seed={data['small']}", "--eval", str(data["eval"]), "--samples-seen", "16",
            "--batch-size", "8", "--image-size", "32", "--curve-points", "1", "--out", str(tmp_path / "o"),
            "--save-model", str(tmp_path / "filter-model"), "--holdout", "0"]  # 12 pairs: too few to hold out
    assert main(argv) == 0
    weights, conf = tmp_path / "filter-model" / "model.safetensors", tmp_path / "filter-model" / "model_config.json"
    assert json.loads(conf.read_text())["vision_cfg"]["image_size"] == 32
    assert saved_model_paths(tmp_path / "m.safetensors") == (tmp_path / "m.safetensors", tmp_path / "m.json")
    weights.unlink()
    assert main(argv) == 0 and weights.exists()  # a finished run whose model file is gone is trained again

    # the same run again (deterministic on CPU) gives the model that was saved
    samples = load_samples(data["small"], 32, tokenizer)
    # --save-model trains with crops on top of flips (filter_train_config)
    model, _ = train_run(samples, filter_train_config(TrainConfig(samples_seen=16, batch_size=8, image_size=32,
                                                                  curve_points=1)), seed=0)
    loaded = build_model(resolve_model(str(conf), str(weights)))
    assert torch.equal(encode_images(model, samples.images, 64, "cpu"),
                       encode_images(loaded.model, samples.images, 64, "cpu"))
    assert torch.equal(encode_texts(model, samples.tokens, 64, "cpu"), encode_texts(loaded.model, samples.tokens, 64, "cpu"))

    # and `curate score` with it writes embeddings equal to the probe's own (float16 storage)
    target = make_colour_dataset(tmp_path / "to_score", 12, offset=200)
    assert main(["score", str(target), "--model", str(conf), "--pretrained", str(weights), "--device", "cpu",
                 "--loader-workers", "0", "--no-progress"]) == 0
    ds = DatasetDir.at(target)
    sig = pq.read_table(ds.signals("score", "00000000")).to_pylist()
    emb = np.load(ds.signals("score", "00000000", ".img_emb.npy")).astype(np.float32)
    mine = encode_images(model, load_samples(target, 32, tokenizer).images, 64, "cpu").numpy()
    assert [r["emb_row"] for r in sig] == list(range(12))
    assert np.abs(emb - mine).max() < 1e-2
    assert (np.sum(emb * mine, axis=1) > 0.999).all()


def test_input_summary_ignores_stages_the_probe_does_not_read(data):
    from curate.io.layout import DatasetDir
    from curate.io.manifest import record_stage
    from curate.train_probe.run import dataset_summary

    before = dataset_summary(str(data["eval"]))
    # scoring the eval dir later (as the demo does for decontamination) must not change the summary
    record_stage(DatasetDir.at(data["eval"]), "score", config={}, fingerprint="f" * 16)
    assert dataset_summary(str(data["eval"])) == before
    assert dataset_summary(str(data["eval"]), ("score",)) != before


# ------------------------------------------------------------------ statistics on synthetic results


def test_mean_and_sample_std_of_known_values():
    from curate.train_probe.stats import mean_std

    assert mean_std([0.25, 0.75]) == pytest.approx((0.5, math.sqrt(0.125)))  # (0.25^2 + 0.25^2) / (2 - 1)
    assert mean_std([0.1, 0.2, 0.6]) == pytest.approx((0.3, math.sqrt(0.07)))  # (0.04 + 0.01 + 0.09) / 2
    assert mean_std([0.4]) == (0.4, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))


def synthetic_runs(mean: float, n_items: int, seeds: int, rng: np.random.Generator) -> list[dict]:
    """Runs whose per-item hits are Bernoulli(mean) (i2t and t2i alike), one per seed."""
    out = []
    for s in range(seeds):
        hits = (rng.random(n_items) < mean).astype(int).tolist()
        out.append({"seed": s, "items": {"i2t_hit5": hits, "t2i_hit5": hits, "zs_correct": hits}})
    return out


def test_ci_excludes_zero_for_a_clear_effect_and_includes_it_for_noise():
    from curate.train_probe.stats import paired_difference, verdict

    rng = np.random.default_rng(0)
    better, worse = synthetic_runs(0.40, 600, 3, rng), synthetic_runs(0.20, 600, 3, rng)
    d = paired_difference(better, worse, "retrieval_r5")
    assert d["seeds"] == 3 and d["ci"][0] > 0 and d["distinguishable"]
    assert abs(d["difference"] - 0.20) < 0.05
    assert "better; the difference is distinguishable from zero" in verdict("curated", "raw", d)
    d = paired_difference(worse, better, "retrieval_r5")
    assert d["ci"][1] < 0 and "worse" in verdict("raw", "curated", d)
    same_a, same_b = synthetic_runs(0.30, 600, 3, rng), synthetic_runs(0.30, 600, 3, rng)
    noise = paired_difference(same_a, same_b, "retrieval_r5")
    assert noise["ci"][0] < 0 < noise["ci"][1] and not noise["distinguishable"]
    assert "not distinguishable from zero" in verdict("a", "b", noise)


def test_ci_pairs_by_seed_and_resamples_balanced_accuracy_per_class():
    from curate.train_probe.stats import paired_difference

    labels = [0] * 90 + [1] * 10  # imbalanced: the rare class counts half in mean per-class accuracy
    a = [{"seed": s, "items": {"zs_correct": [1] * 90 + [1] * 10}} for s in range(2)]
    b = [{"seed": s, "items": {"zs_correct": [1] * 90 + [0] * 10}} for s in (1, 2)]  # seed 2 has no partner
    d = paired_difference(a, b, "zeroshot_balanced", labels)
    assert d["seeds"] == 1 and d["difference"] == pytest.approx(0.5)
    assert d["ci"][0] > 0.3


# ------------------------------------------------------------------ quality vs quantity


def test_repetition_decay_fit_recovers_known_parameters():
    from curate.train_probe.study import predicted_error, quality_quantity

    a, bs, tau, d = 1e-2, (-0.20, -0.17, -0.15), 2.0, 0.2
    fractions, pool, budgets = (0.1, 0.3, 1.0), 20000, (2000, 8000, 32000, 128000)
    summary = []
    for f, b in zip(fractions, bs, strict=True):
        for n in budgets:
            err = predicted_error(n, pool * f, a, b, tau, d)
            summary.append({"kind": "top" if f < 1 else "all", "fraction": f, "budget": n, "subset_size": pool * f,
                            "retrieval_r5_mean": 1 - err, "retrieval_r5_std": 0.0})
    study = quality_quantity(summary, "retrieval_r5")
    p = study["params"]
    assert p["tau_epochs"] == pytest.approx(tau, rel=0.02) and p["d"] == pytest.approx(d, abs=0.01)
    assert p["a"] == pytest.approx(a, rel=0.05)
    assert [p["b"][str(f)] for f in fractions] == pytest.approx(bs, rel=0.02)
    assert study["rmse"] < 1e-6
    rec = {b["budget"]: b["recommended_fraction"] for b in study["per_budget"]}
    # the small high-utility pool wins at small compute and loses to more data as repetitions pile up
    assert rec == {2000: 0.1, 8000: 0.1, 32000: 0.3, 128000: 1.0}
    assert all(b["recommended_fraction"] == b["measured_best_fraction"] for b in study["per_budget"])


@pytest.mark.slow
def test_budgets_command_trains_each_fraction_per_budget_and_writes_the_study(data, tmp_path):
    src = make_colour_dataset(tmp_path / "src", 32, offset=900)
    keys = [k for f in DatasetDir.at(src).ledger_files() for k in pq.read_table(f).column("key").to_pylist()]
    add_scores(src, {k: float(i) for i, k in enumerate(keys)})
    out = tmp_path / "study"
    assert main(["train-probe", "--sweep-source", str(src), "--sweep", "clip_score=0.25,0.5,1", "--budgets",
                 "8,16,32", "--eval", str(data["eval"]), "--samples-seen", "16", "--batch-size", "8",
                 "--image-size", "32", "--curve-points", "1", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    grid = {(s["fraction"], s["budget"]) for s in res["summary"] if s["kind"] in ("top", "all")}
    assert grid == {(f, b) for f in (0.25, 0.5, 1.0) for b in (8, 16, 32)}
    assert {(r["budget"], r["samples_seen"]) for r in res["runs"]} == {(8, 8), (16, 16), (32, 32)}
    study = res["study"]
    assert [b["budget"] for b in study["per_budget"]] == [8, 16, 32]
    assert all(b["recommended_fraction"] in (0.25, 0.5, 1.0) for b in study["per_budget"])
    assert sum(len(b["measured"]) for b in study["per_budget"]) == 9
    assert study["rmse"] == pytest.approx(grid_rmse(study), rel=1e-6)
    assert "Quality vs quantity" in (out / "results.md").read_text()
    assert (out / "study.png").read_bytes()[:4] == b"\x89PNG"


def grid_rmse(study: dict) -> float:
    """The RMSE of a study's fitted curve against its measured grid, one residual per (fraction, budget) cell."""
    gaps = [b["predicted"][f] - m for b in study["per_budget"] for f, m in b["measured"].items()]
    return float(np.sqrt(np.mean(np.square(gaps))))


def test_export_top_fraction_auto_keeps_the_fraction_a_real_study_recommends(data, tmp_path, capsys):
    """A study written by the real train-probe stage over an export of the clauses, then `export --top-fraction
    auto` with the same clauses: the kept rows are the study's top subset at the recommended fraction."""
    from curate.io.manifest import load
    from curate.pipeline import run as run_pipeline
    from curate.train_probe.study import recommend

    src = make_colour_dataset(tmp_path / "src", 40, offset=700)
    keys = [k for f in DatasetDir.at(src).ledger_files() for k in pq.read_table(f).column("key").to_pylist()]
    add_scores(src, {k: float(i) for i, k in enumerate(keys)})
    clause = "clip_score >= 8"  # what a policy's clauses leave: 32 rows
    assert main(["export", str(src), "--where", clause, "--out", str(tmp_path / "filtered")]) == 0
    study_dir = tmp_path / "study"  # the sweep reads the export's ledger (it carries clip_score)
    assert main(["train-probe", "--sweep-source", str(tmp_path / "filtered"), "--sweep", "clip_score=0.25,0.5,1",
                 "--budgets", "8,16,32", "--eval", str(data["eval"]), "--samples-seen", "8", "--batch-size", "8",
                 "--image-size", "32", "--curve-points", "1", "--out", str(study_dir)]) == 0
    results = json.loads((study_dir / "results.json").read_text())
    assert {s["subset_size"] for s in results["summary"] if s["kind"] == "all"} == {32}
    for budget in (16, 32):
        rec = recommend(results["study"], budget)
        out = tmp_path / f"auto{budget}"
        capsys.readouterr()
        assert main(["export", str(src), "--where", clause, "--top-fraction", "auto", "--study", str(study_dir),
                     "--budget", str(budget), "--out", str(out)]) == 0
        assert f"--top-fraction auto -> {rec['fraction']:g} by clip_score at {budget}" in capsys.readouterr().err
        kept = sorted(k for f in DatasetDir.at(out).ledger_files() for k in pq.read_table(f).column("key").to_pylist())
        name = "all-100%" if rec["fraction"] == 1.0 else f"top-{rec['fraction'] * 100:g}%"
        sub = next(s for s in results["subsets"] if s["subset"] == name and s["budget"] in (None, 8))
        assert len(kept) == sub["selected"]
        assert kept == sorted(keys[40 - len(kept):])  # the best rows by clip_score
        entry = load(DatasetDir.at(out))["stages"]["export"]
        auto = entry["inputs"]["top_fraction_auto"]
        assert entry["config"]["top_fraction"] == "auto" and entry["config"]["budget"] == budget
        assert auto["budget"] == budget and auto["fraction"] == rec["fraction"] and auto["column"] == "clip_score"
        assert auto["study"] == str(study_dir / "results.json") and len(auto["study_sha256"]) == 64
        # the manifest records the study's own fit, whose RMSE is that of the curve against the measured grid
        assert auto["fit"] == json.loads(json.dumps(rec["fit"])) and not auto["extrapolated"]
        assert auto["fit"]["rmse"] == pytest.approx(grid_rmse(results["study"]), rel=1e-6)
    assert recommend(results["study"], 1000)["extrapolated"]
    # the same in a pipeline's YAML: the fields are the flags
    yml = tmp_path / "p.yaml"
    yml.write_text(f"workdir: {tmp_path}\nstages:\n  - stage: export\n    args: [{src}]\n    where: ['{clause}']\n"
                   f"    top_fraction: auto\n    study: {study_dir}\n    budget: 16\n    out: {tmp_path}/yaml-out\n")
    run_pipeline(yml, echo=lambda _msg: None)
    assert sorted(k for f in DatasetDir.at(tmp_path / "yaml-out").ledger_files()
                  for k in pq.read_table(f).column("key").to_pylist()) == sorted(
        k for f in DatasetDir.at(tmp_path / "auto16").ledger_files() for k in pq.read_table(f).column("key").to_pylist())


@pytest.mark.parametrize("args, message", [
    (["--top-fraction", "auto", "--budget", "16"], "needs --study DIR"),
    (["--top-fraction", "auto", "--study", "STUDY"], "needs --study DIR"),
    (["--study", "STUDY", "--budget", "16"], "only with --top-fraction auto"),
    (["--top-fraction", "most"], "a number in (0, 1] or auto"),
    (["--top-fraction", "auto", "--study", "PLAIN", "--budget", "16"], "no quality-vs-quantity study"),
    (["--top-fraction", "auto", "--study", "NOWHERE", "--budget", "16"], "no results.json"),
])
def test_export_top_fraction_auto_bad_arguments_exit_2(data, tmp_path, capsys, args, message):
    src = make_colour_dataset(tmp_path / "src", 12, offset=300)
    keys = [k for f in DatasetDir.at(src).ledger_files() for k in pq.read_table(f).column("key").to_pylist()]
    add_scores(src, {k: float(i) for i, k in enumerate(keys)})
    plain = tmp_path / "plain"  # a probe without --budgets: results.json but no study
    if "PLAIN" in args:
        assert main(_probe_args(data, plain)) == 0
    subst = {"STUDY": str(tmp_path), "PLAIN": str(plain), "NOWHERE": str(tmp_path / "nowhere")}
    assert main(["export", str(src), "--by", "clip_score", "--out", str(tmp_path / "o"),
                 *[subst.get(a, a) for a in args]]) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------ zero-shot templates


def test_shipped_template_sets_and_a_template_file(data, tmp_path, capsys):
    from curate.io.manifest import load, record_stage
    from curate.train_probe.templates import load_templates, resolve_templates, shipped

    assert set(shipped()) >= {"photo", "clipart", "icon", "generic"}
    assert all("{c}" in t for name in shipped() for t in load_templates(name))
    assert resolve_templates("auto", {}).name == "generic"
    assert resolve_templates("auto", {"zero_shot_templates": "icon"}).templates == load_templates("icon")
    mine = tmp_path / "mine.txt"
    mine.write_text("# my prompts\na swatch of {c}\n\n{c} colour\n")
    out = tmp_path / "o"
    argv = ["train-probe", "--subset", f"s={data['small']}", "--eval", str(data["eval"]), "--samples-seen", "8",
            "--batch-size", "8", "--image-size", "32", "--curve-points", "1", "--out", str(out), "--templates", str(mine)]
    assert main(argv) == 0
    cfg = json.loads((out / "results.json").read_text())["config"]["templates"]
    assert cfg["prompts"] == ["a swatch of {c}", "{c} colour"] and cfg["source"] == "flag"
    # the eval dir names its set; a file without {c} is refused before training
    eval_ds = DatasetDir.at(data["eval"])
    man = load(eval_ds)
    record_stage(eval_ds, "download", config={}, fingerprint=man["stages"].get("download", {}).get("fingerprint"))
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo\n")
    assert main([*argv[:-1], str(bad)]) == 2
    assert "exactly one '{c}'" in capsys.readouterr().err


# ------------------------------------------------------------------ filters that check themselves


@pytest.fixture(scope="module")
def few_hundred_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 real image-caption pairs of the demo corpus's trusted seed split."""
    from curate.demo.corpus import load_split

    rows = load_split("seed", columns=["image", "caption"]).to_pylist()[:300]
    root = tmp_path_factory.mktemp("trusted") / "ds"
    make_dataset(root, [(r["image"], r["caption"], "success") for r in rows], shard_size=100)
    return root


def test_a_filter_model_trained_on_a_few_hundred_pairs_is_flagged_weak(few_hundred_pairs, data, tmp_path, capsys):
    from curate.train_probe.quality import read_quality

    model_dir = tmp_path / "filter"
    assert main(["train-probe", "--subset", f"trusted={few_hundred_pairs}", "--eval", str(data["eval"]),
                 "--samples-seen", "1024", "--batch-size", "32", "--image-size", "32", "--out", str(tmp_path / "p"),
                 "--save-model", str(model_dir)]) == 0
    q = read_quality(model_dir / "model.safetensors")
    assert q is not None and q["weak"] and 20 <= q["heldout_pairs"] <= 40
    assert q["train_pairs"] + q["stop_pairs"] + q["heldout_pairs"] == 300  # the check is not the stopping half
    assert q["lift"] < 2 and q["chance_r5"] == pytest.approx(5 / q["heldout_pairs"], rel=1e-4)
    assert q["crop"] == 0.3 and q["early_stop"]["best_step"] >= 1
    res = json.loads((tmp_path / "p" / "results.json").read_text())
    assert res["filter_quality"]["weak"] and "WEAK" in (tmp_path / "p" / "results.md").read_text()
    capsys.readouterr()
    # curate score with it warns loudly, records the check in the manifest, and the report shows it
    target = make_colour_dataset(tmp_path / "to_score", 8, offset=300)
    assert main(["score", str(target), "--model", str(model_dir / "model_config.json"), "--pretrained",
                 str(model_dir / "model.safetensors"), "--device", "cpu", "--loader-workers", "0", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "WARNING: the filter model" in err and "near chance" in err
    man = json.loads((target / "manifest.json").read_text())
    assert man["stages"]["score"]["inputs"]["filter_quality"]["weak"]
    report = tmp_path / "r.html"
    assert main(["report", str(target), "--out", str(report)]) == 0
    assert "near chance on its own held-out pairs" in report.read_text()


# ------------------------------------------------------------------ augmentation for small trusted sets


def test_caption_augmentation_draws_non_empty_keyword_subsets_in_random_order():
    import random

    from curate.train_probe.train import augment_caption

    caption = "Hen, chicken, animal, farm, bird"
    parts = set(caption.split(", "))
    rng = random.Random(0)
    seen = [augment_caption(caption, rng) for _ in range(400)]
    for s in seen:
        got = s.split(", ")
        assert got and len(set(got)) == len(got) and set(got) <= parts  # a non-empty subset, no repeats
    assert len(set(seen)) > 50  # subsets and orders vary
    assert any(s.split(", ")[0] != "Hen" and "Hen" in s for s in seen)  # order changes, not only membership
    assert sum(len(s.split(", ")) for s in seen) / len(seen) == pytest.approx(2.5, abs=0.3)  # each part kept at 1/2
    assert augment_caption("a single phrase", rng) == "a single phrase"
    assert [augment_caption(caption, random.Random(7)) for _ in range(3)] == \
        [augment_caption(caption, random.Random(7)) for _ in range(3)]  # seeded: repeatable


def test_number_switching_follows_plain_english_rules():
    import random

    from curate.train_probe.train import augment_caption, switch_number

    pairs = [("bird", "birds"), ("box", "boxes"), ("city", "cities"), ("church", "churches"), ("day", "days"),
             ("traffic sign", "traffic signs")]
    for one, many in pairs:
        assert switch_number(one) == many and switch_number(many) == one
    for same in ("glass", "x1", "of", "3d"):  # -ss, non-alphabetic, too short: left alone
        assert switch_number(same) == same
    rng = random.Random(0)
    out = {augment_caption("bird", rng, inflect=1.0) for _ in range(5)}
    assert out == {"birds"}


def test_colour_jitter_keeps_shape_and_range_and_is_off_at_zero():
    from curate.train_probe.train import augment_batch, jitter_batch

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 16, 16), generator=g, dtype=torch.uint8)
    out = jitter_batch(images, 0.4, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8 and not torch.equal(out, images)
    assert torch.equal(jitter_batch(images, 0.0, torch.Generator().manual_seed(1)), images)
    # the defaults (jitter 0) draw nothing extra: the flips are exactly those of before
    cfg = TrainConfig(**FAST)
    a = augment_batch(images, cfg, torch.Generator().manual_seed(3))
    flip = torch.rand(6, generator=torch.Generator().manual_seed(3)) < 0.5
    assert torch.equal(a, torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images))


def test_caption_augmented_training_runs_is_deterministic_and_differs(data, tokenizer):
    train = load_samples(data["big"], 32, tokenizer)
    train.captions = [f"{c}, square, colour swatch" for c in train.captions]
    cfg = TrainConfig(samples_seen=8 * 4, caption_augment=True, caption_inflect=0.5, jitter=0.2, **FAST)
    _, a = train_run(train, cfg, seed=0)
    _, b = train_run(train, cfg, seed=0)
    _, plain = train_run(train, TrainConfig(samples_seen=8 * 4, jitter=0.2, **FAST), seed=0)
    assert a["loss_last"] == b["loss_last"] and a["loss_last"] != plain["loss_last"]


def test_new_train_options_at_their_defaults_keep_old_fingerprints(data):
    """Probe outputs made before --jitter/--caption-augment existed still resume: at their defaults the
    new fields are left out of the fingerprint; set, they change it."""
    from dataclasses import replace

    from curate.config import fingerprint, output_fields
    from curate.train_probe.run import ProbeConfig, probe_fingerprint

    cfg = ProbeConfig(subsets=(("a", str(data["big"])),), eval_dir=str(data["eval"]))
    train = TrainConfig(**FAST)
    fp, inputs = probe_fingerprint(cfg, train)
    old = {k: v for k, v in output_fields(train).items() if k not in ("jitter", "caption_augment", "caption_inflect")}
    assert fp == fingerprint(cfg, extra={"train": old, "inputs": inputs, "templates": []})
    assert probe_fingerprint(cfg, replace(train, caption_augment=True))[0] != fp
    assert probe_fingerprint(cfg, replace(train, jitter=0.1))[0] != fp


def test_caption_inflect_needs_caption_augment(data, tmp_path, capsys):
    assert main(["train-probe", "--subset", f"a={data['big']}", "--eval", str(data["eval"]), "--caption-inflect",
                 "0.5", "--out", str(tmp_path / "o")]) == 2
    assert "--caption-inflect" in capsys.readouterr().err
