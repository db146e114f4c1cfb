"""The train-probe experiment: every (subset, seed) run at equal samples seen, resumable, then the outputs.

OUT/runs/{subset}--seed{seed}.json is written atomically when a run ends; a rerun with the same config
fingerprint skips finished runs, and one with another fingerprint is refused unless --redo.
OUT/manifest.json records the config, the fingerprint and the input summary (curate.io.manifest).

Comparisons are paired by seed with bootstrap CIs (stats.py); `--budgets` trains the sweep's kept
fractions at several samples-seen budgets and fits the repetition-decay law (study.py); `--save-model`
holds out part of the trusted set, stops early on it and records the held-out check (quality.py).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from curate.config import fingerprint, output_fields, to_dict
from curate.errors import InputError
from curate.io.atomic import clean_tmp, read_json, write_json
from curate.io.layout import DatasetDir
from curate.io.manifest import check_fingerprint, load, record_stage
from curate.options import absolute, option
from curate.train_probe.data import dataset_shards, load_samples, read_labels
from curate.train_probe.evaluate import chance_level, evaluate_model
from curate.train_probe.quality import MIN_HELDOUT, heldout_retrieval, quality_record, split_holdout
from curate.train_probe.report import write_outputs
from curate.train_probe.sweep import parse_sweep, read_column, sweep_subsets
from curate.train_probe.templates import resolve_templates
from curate.train_probe.train import (
    TrainConfig,
    check_config,
    model_config,
    resolve_device,
    save_model,
    saved_model_paths,
    train_run,
)

log = logging.getLogger(__name__)
STAGE = "train-probe"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_LATER_FIELDS = ("jitter", "caption_augment", "caption_inflect")  # TrainConfig fields newer than existing probe outputs


def _subsets(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return tuple(parse_subset(v) for v in values)


def _budgets(text: str | None) -> tuple[int, ...]:
    return parse_budgets(text) if text else ()


@dataclass(frozen=True)
class ProbeConfig:
    subsets: tuple[tuple[str, str], ...] = option(  # (name, absolute dataset dir)
        (), flag="subset", cli_type=tuple[str, ...], convert=_subsets, metavar="NAME=DIR",
        help="A dataset dir to train on, under a name (repeatable), e.g. raw=pool curated=export.")
    eval_dir: str = ""  # --eval (absolute)
    label_column: str = option("label", help="The eval ledger's class column.")
    seeds: int = option(1, help="Runs per subset (seeds 0..K-1).")
    sweep: str | None = option(None, metavar="COLUMN=F1,F2,...",
                               help="Also train on the top fraction F by COLUMN of --sweep-source, and random subsets "
                                    "of the same sizes, e.g. clip_score=0.1,0.3,0.5,1.0.")
    sweep_seeds: int | None = option(None, help="Seeds per sweep subset (default: --seeds, so sweep points are "
                                                "compared paired by seed too).")
    budgets: tuple[int, ...] = option(
        (), cli_type=str, cli_default=None, convert=_budgets, metavar="N1,N2,...",
        help="Quality-vs-quantity study: also train each --sweep top fraction (and 100%) at these samples-seen "
             "budgets, fit the repetition-decay law (Goyal et al. 2024) and recommend a kept fraction per budget.")
    templates: str = option("auto", metavar="NAME|FILE",
                            help="Zero-shot prompts: a shipped set (photo, clipart, icon, generic), a file with one "
                                 "prompt per line using {c}, or auto (the eval manifest's zero_shot_templates, else "
                                 "generic).")
    sweep_source: str | None = option(None, click_type=click.Path(file_okay=False),
                                      help="A scored dataset dir (signals/score) the sweep selects from (default: the "
                                           "first --subset).")
    save_model: str | None = option(
        None, runtime=True, convert=absolute, click_type=click.Path(),
        help="Write the trained model (seed 0 of the single --subset): X.safetensors + X.json, or for a directory "
             "X/model.safetensors + X/model_config.json; `curate score --model CONFIG.json --pretrained "
             "WEIGHTS.safetensors` loads them. Holds out --holdout of the pairs, stops early on their retrieval and "
             "records it against chance in the checkpoint's metadata.")
    holdout: float = option(0.2, help="--save-model: share of the trusted pairs held out (0: no check, no early "
                                      "stopping).")
    patience: int = option(3, help="--save-model: evaluation points without a better held-out retrieval before "
                                   "stopping.")
    workers: int = option(2, runtime=True, help="Image decoding threads.")

    @property
    def sweep_seed_count(self) -> int:
        return self.sweep_seeds if self.sweep_seeds is not None else self.seeds


def parse_subset(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise InputError(f"--subset: expected NAME=DIR, got '{text}'")
    if not _NAME.match(name):
        raise InputError(f"--subset: name '{name}' must be letters, digits, '.', '_' or '-'")
    return name, str(Path(path).expanduser().resolve())


def parse_budgets(text: str) -> tuple[int, ...]:
    """--budgets N1,N2,...: distinct positive samples-seen budgets, ascending."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise InputError(f"--budgets: expected integers N1,N2,... (samples seen), got '{text}'") from None
    if not values or any(v < 1 for v in values):
        raise InputError(f"--budgets: expected positive integers N1,N2,... (samples seen), got '{text}'")
    return tuple(values)


def run_file(out: Path, subset: str, seed: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", subset.replace("%", "pct"))
    return out / "runs" / f"{safe}--seed{seed}.json"


def dataset_summary(path: str, stages: tuple[str, ...] = ()) -> dict[str, Any]:
    """What a run's inputs were: shard names and sizes plus the fingerprints of the stages it reads.

    Only the stages that made the shards (download or export) and those in `stages` count: scoring
    the eval dir after a probe used it (the demo does) must not block resuming that probe.
    """
    ds = DatasetDir.at(path)
    shards = ds.shards()
    man = load(ds)
    summary: dict[str, Any] = {
        "path": str(ds.root), "shards": len(shards),
        "tar_bytes": sum(ds.shard_tar(s).stat().st_size for s in shards if ds.shard_tar(s).exists()),
        "stage_fingerprints": {k: v.get("fingerprint") for k, v in sorted(man.get("stages", {}).items())
                               if k in ("download", "export", *stages)},
    }
    for stage in stages:
        files = ds.signal_files(stage)
        summary[f"{stage}_signal_bytes"] = sum(f.stat().st_size for f in files)
    return summary


def check_inputs(cfg: ProbeConfig, train: TrainConfig) -> None:
    """Everything that can be wrong with the arguments, before any decoding or training (exit 2)."""
    check_config(train)
    model_config(train)  # unknown --model: exit 2 now
    if not cfg.subsets and not cfg.sweep:
        raise InputError("--subset: give at least one --subset NAME=DIR (or --sweep with --sweep-source)")
    names = [n for n, _ in cfg.subsets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"--subset: name(s) given twice: {', '.join(dup)}")
    for _, path in cfg.subsets:
        dataset_shards(path, "--subset")
    if not cfg.eval_dir:
        raise InputError("--eval: an evaluation dataset dir with a label column is required")
    eval_ds, _ = dataset_shards(cfg.eval_dir, "--eval")
    if not read_labels(eval_ds, cfg.label_column, "--eval"):
        raise InputError(f"--eval: the '{cfg.label_column}' column of {eval_ds.root}/ledger is empty")
    if cfg.seeds < 1:
        raise InputError(f"--seeds: must be at least 1 (got {cfg.seeds})")
    if cfg.sweep_seeds is not None and cfg.sweep_seeds < 1:
        raise InputError(f"--sweep-seeds: must be at least 1 (got {cfg.sweep_seeds})")
    if cfg.budgets and not cfg.sweep:
        raise InputError("--budgets: needs --sweep COLUMN=F1,F2,... (the kept fractions to train at each budget)")
    bad = [b for b in cfg.budgets if b < 1]
    if bad:
        raise InputError(f"--budgets: samples-seen budgets must be positive integers (got {bad})")
    if not 0 <= cfg.holdout < 1:
        raise InputError(f"--holdout: must be in [0, 1) (got {cfg.holdout})")
    if cfg.patience < 1:
        raise InputError(f"--patience: must be at least 1 (got {cfg.patience})")
    if cfg.sweep_source and not cfg.sweep:
        raise InputError("--sweep-source: needs --sweep COLUMN=F1,F2,...")
    if cfg.sweep and not cfg.sweep_source:
        raise InputError("--sweep: needs --sweep-source DIR (a scored dataset dir) or a --subset to default to")
    if cfg.sweep:
        spec = parse_sweep(cfg.sweep)
        ds, _ = dataset_shards(cfg.sweep_source, "--sweep-source")
        read_column(ds, spec.column)
    if cfg.save_model:
        if len(cfg.subsets) != 1 or cfg.sweep:
            raise InputError("--save-model: saves the model of a single --subset (without --sweep); "
                             f"got {len(cfg.subsets)} subset(s){' and a sweep' if cfg.sweep else ''}")
        if Path(cfg.save_model).is_file() and not cfg.save_model.endswith(".safetensors"):
            raise InputError(f"--save-model: {cfg.save_model} is a file; give X.safetensors or a directory")


def probe_fingerprint(cfg: ProbeConfig, train: TrainConfig,
                      templates: tuple[str, ...] = ()) -> tuple[str, dict[str, Any]]:
    inputs = {
        "subsets": {name: dataset_summary(path) for name, path in cfg.subsets},
        "eval": dataset_summary(cfg.eval_dir),
    }
    if cfg.sweep_source:
        inputs["sweep_source"] = dataset_summary(cfg.sweep_source, ("score",))
    fields = output_fields(train)
    for name in _LATER_FIELDS:  # fields added later are left out at their default, so old runs still resume
        if fields.get(name) == getattr(TrainConfig, name):
            fields.pop(name)
    extra = {"train": fields, "inputs": inputs, "templates": list(templates)}
    return fingerprint(cfg, extra=extra), inputs


def filter_train_config(train: TrainConfig) -> TrainConfig:
    """--save-model trains a filter: random crops on top of flips (unless --crop was set), and at least 10
    evaluation points so early stopping has points to choose from."""
    from dataclasses import replace

    return replace(train, crop=train.crop or 0.3, augment=True, curve_points=max(train.curve_points, 10))


class _Loader:
    """Loads each dataset dir once, on first use (a fully resumed run decodes nothing)."""

    def __init__(self, train: TrainConfig, workers: int):
        import open_clip

        self.train, self.workers = train, workers
        self.tokenizer = open_clip.get_tokenizer(model_config(train)[0])
        self._cache: dict[tuple[str, str | None], Any] = {}

    def get(self, path: str, flag: str, label_column: str | None = None) -> Any:
        key = (path, label_column)
        if key not in self._cache:
            log.info("loading %s", path)
            self._cache[key] = load_samples(path, self.train.image_size, self.tokenizer, flag=flag,
                                            label_column=label_column, threads=self.workers)
        return self._cache[key]


def plan_subsets(cfg: ProbeConfig, loader: _Loader) -> list[dict[str, Any]]:
    """[{name, kind, fraction, path, keys, seeds, alias}]: the --subset dirs first, then the sweep.

    The sweep's 100% point is the whole source; when a --subset is that same dir, its runs stand in for
    it (`alias`) instead of training the same data twice.
    """
    subsets: list[dict[str, Any]] = [{"name": n, "kind": "subset", "fraction": None, "path": p, "keys": None,
                                      "seeds": cfg.seeds, "alias": None, "budget": None} for n, p in cfg.subsets]
    if cfg.sweep:
        spec = parse_sweep(cfg.sweep)
        keys, values = read_column(DatasetDir.at(cfg.sweep_source), spec.column)
        available = set(loader.get(cfg.sweep_source, "--sweep-source").keys)
        same = [n for n, p in cfg.subsets if p == cfg.sweep_source]
        planned = sweep_subsets(keys, values, spec, available)
        main_budget = loader.train.samples_seen if cfg.budgets else None
        for s in planned:
            alias = same[0] if s["kind"] == "all" and same else None
            subsets.append({**s, "path": cfg.sweep_source, "seeds": cfg.sweep_seed_count, "alias": alias,
                            "budget": main_budget})
        # the study: every kept fraction (top, and all at 100%) again at each other budget
        for budget in sorted(set(cfg.budgets) - {loader.train.samples_seen}):
            for s in planned:
                if s["kind"] in ("top", "all"):
                    subsets.append({**s, "name": f"{s['name']}@{budget}", "path": cfg.sweep_source,
                                    "seeds": cfg.sweep_seed_count, "alias": None, "budget": budget})
    return subsets


def run_probe(cfg: ProbeConfig, train: TrainConfig, out: str | Path, *, redo: bool = False) -> dict[str, Any]:
    """Run (or resume) the experiment and write the outputs; returns the results object."""
    check_inputs(cfg, train)
    if cfg.save_model:
        train = filter_train_config(train)
    tset = resolve_templates(cfg.templates, load(DatasetDir.at(cfg.eval_dir)))
    out = Path(out).expanduser().resolve()
    out_ds = DatasetDir.at(out)
    fp, inputs = probe_fingerprint(cfg, train, tset.templates)
    if check_fingerprint(out_ds, STAGE, fp, redo):
        for f in (out / "runs").glob("*.json") if (out / "runs").exists() else []:
            f.unlink()
    if out.exists():
        clean_tmp(out)
    config = {"probe": to_dict(cfg), "train": to_dict(train),
              "templates": {"name": tset.name, "source": tset.source, "prompts": list(tset.templates)}}
    record_stage(out_ds, STAGE, config=config, fingerprint=fp, inputs=inputs, status="running")

    ctx = _RunContext(cfg, train, out, fp, resolve_device(train.device), tset.templates)
    subsets = plan_subsets(cfg, ctx.loader)
    runs: list[dict[str, Any]] = []
    for sub in subsets:
        if sub["alias"]:
            runs += [{**r, "subset": sub["name"], "kind": sub["kind"], "fraction": sub["fraction"],
                      "budget": sub["budget"], "alias": sub["alias"]}
                     for r in list(runs) if r["subset"] == sub["alias"]]
            continue
        for seed in range(sub["seeds"]):
            runs.append(ctx.run(sub, seed))
    eval_set = ctx.eval_set()
    chance = chance_level(eval_set)
    column = cfg.sweep.partition("=")[0].strip() if cfg.sweep else None
    classes = sorted(set(eval_set.labels or []))
    labels = [classes.index(c) for c in eval_set.labels or []]
    results = write_outputs(out, config=config, runs=runs, subsets=subsets, chance=chance, sweep_column=column,
                            labels=labels)
    counts = {"runs": len(runs), "trained": ctx.trained, "resumed": ctx.skipped, "eval_samples": len(eval_set),
              "eval_classes": len(classes)}
    record_stage(out_ds, STAGE, config=config, fingerprint=fp, inputs=inputs, counts=counts)
    results["counts"] = counts
    return results


class _RunContext:
    """What every (subset, seed) run needs: the loader, the eval set (decoded on first use) and the counters."""

    def __init__(self, cfg: ProbeConfig, train: TrainConfig, out: Path, fp: str, device: str,
                 templates: tuple[str, ...]):
        self.cfg, self.train, self.out, self.fp, self.device, self.templates = cfg, train, out, fp, device, templates
        self.loader = _Loader(train, cfg.workers)
        self._eval: Any = None
        self.trained = self.skipped = 0

    def eval_set(self) -> Any:
        if self._eval is None:
            self._eval = self.loader.get(self.cfg.eval_dir, "--eval", self.cfg.label_column)
        return self._eval

    def evaluate(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        return evaluate_model(model, tokenizer, self.eval_set(), self.device, templates=self.templates, items=True)

    def run(self, sub: dict[str, Any], seed: int) -> dict[str, Any]:
        """One run's result: read back when already done with this fingerprint, else trained and written."""
        from dataclasses import replace

        path = run_file(self.out, sub["name"], seed)
        save_here = bool(self.cfg.save_model) and seed == 0
        if path.exists():
            prev = read_json(path)
            if prev.get("fingerprint") == self.fp and (not save_here or saved_model_paths(self.cfg.save_model)[0].exists()):
                self.skipped += 1
                return prev["result"]
        self.eval_set()
        samples = self.loader.get(sub["path"], "--sweep-source" if sub["keys"] is not None else "--subset")
        if sub["keys"] is not None:
            samples = samples.select_keys(sub["keys"])
        train = replace(self.train, samples_seen=sub["budget"]) if sub.get("budget") else self.train
        if save_here:
            result = self._train_filter(samples, train, seed)
        else:
            _, result = self._train(samples, train, seed)
        result = {"subset": sub["name"], "kind": sub["kind"], "fraction": sub["fraction"], "budget": sub.get("budget"),
                  **result}
        write_json(path, {"fingerprint": self.fp, "result": result})
        log.info("%s seed %d: zero-shot top-1 %.3f, i2t R@1 %.3f (%d samples seen, %.2f epochs, %.1fs)",
                 sub["name"], seed, result.get("zeroshot_top1", float("nan")), result.get("i2t_r1", float("nan")),
                 result["samples_seen"], result["epochs"], result["train_seconds"])
        self.trained += 1
        return result

    def _train(self, samples: Any, train: TrainConfig, seed: int, **kw: Any) -> tuple[Any, dict[str, Any]]:
        return train_run(samples, train, seed, evaluate=self.evaluate, device=self.device, **kw)

    def _train_filter(self, samples: Any, train: TrainConfig, seed: int) -> dict[str, Any]:
        """--save-model: hold out part of the trusted pairs, stop early on their retrieval, save the best
        model with the held-out check in its metadata."""
        quality = None
        if self.cfg.holdout > 0:
            train_rows, held_rows = split_holdout(samples.keys, self.cfg.holdout)
            # half of the held-out pairs choose when to stop, the other half is the check: a check on the
            # pairs that picked the checkpoint would be the best of several noisy looks, biased upwards
            stop_rows, check_rows = held_rows[0::2], held_rows[1::2]
            if len(check_rows) < MIN_HELDOUT:
                raise InputError(f"--holdout: {self.cfg.holdout} of {len(samples)} trusted pairs is {len(held_rows)} "
                                 f"held-out pairs, half of them ({len(check_rows)}) for the check, fewer than "
                                 f"{MIN_HELDOUT}; raise --holdout or add pairs")
            stop, check = samples.select(stop_rows), samples.select(check_rows)
            model, result = self._train(samples.select(train_rows), train, seed, patience=self.cfg.patience,
                                        early_stop=lambda m: heldout_retrieval(m, stop, self.device)["retrieval_r5"])
            extra = {"early_stop": result.get("early_stop"), "stop_pairs": len(stop_rows), "crop": train.crop,
                     "flip": train.augment, "samples_seen": result["samples_seen"], "epochs": result["epochs"]}
            quality = quality_record(heldout_retrieval(model, check, self.device), len(train_rows), extra)
            result["filter_quality"] = quality
            log.warning("filter model: %s", quality["verdict"])
        else:
            model, result = self._train(samples, train, seed)
        weights, conf_path = save_model(model, model_config(train)[1], self.cfg.save_model, quality=quality)
        result["saved_model"] = {"weights": str(weights), "config": str(conf_path)}
        return result
