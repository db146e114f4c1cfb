"""The train-probe experiment: every (subset, seed) run at equal samples seen, resumable, then the outputs.

OUT/runs/{subset}--seed{seed}.json is written atomically when a run ends; a rerun with the same config
fingerprint skips finished runs, and one with another fingerprint is refused unless --redo.
OUT/manifest.json records the config, the fingerprint and the input summary (curate.io.manifest).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.config import fingerprint, output_fields, runtime, to_dict
from curate.errors import InputError
from curate.io.atomic import clean_tmp, read_json, write_json
from curate.io.layout import DatasetDir
from curate.io.manifest import check_fingerprint, record_stage
from curate.train_probe.train import TrainConfig

log = logging.getLogger(__name__)
STAGE = "train-probe"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ProbeConfig:
    subsets: tuple[tuple[str, str], ...] = ()  # (name, absolute dataset dir)
    eval_dir: str = ""
    label_column: str = "label"
    seeds: int = 1
    sweep_seeds: int = 1  # the sweep's many subsets get fewer seeds than the named subsets by default
    sweep: str | None = None  # "COLUMN=F1,F2,..."
    sweep_source: str | None = None
    save_model: str | None = runtime(None)
    workers: int = runtime(2)  # decode threads


def parse_subset(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise InputError(f"--subset: expected NAME=DIR, got '{text}'")
    if not _NAME.match(name):
        raise InputError(f"--subset: name '{name}' must be letters, digits, '.', '_' or '-'")
    return name, str(Path(path).expanduser().resolve())


def run_file(out: Path, subset: str, seed: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", subset.replace("%", "pct"))
    return out / "runs" / f"{safe}--seed{seed}.json"


def dataset_summary(path: str, stages: tuple[str, ...] = ()) -> dict[str, Any]:
    """What a run's inputs were: shard names and sizes plus the fingerprints of the stages it reads.

    Only the stages that made the shards (download or export) and those in `stages` count: scoring
    the eval dir after a probe used it (the demo does) must not block resuming that probe.
    """
    from curate.io.manifest import load

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
    from curate.train_probe.data import dataset_shards, read_labels
    from curate.train_probe.sweep import parse_sweep
    from curate.train_probe.train import check_config, model_config

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
    if cfg.sweep_seeds < 1:
        raise InputError(f"--sweep-seeds: must be at least 1 (got {cfg.sweep_seeds})")
    if cfg.sweep_source and not cfg.sweep:
        raise InputError("--sweep-source: needs --sweep COLUMN=F1,F2,...")
    if cfg.sweep and not cfg.sweep_source:
        raise InputError("--sweep: needs --sweep-source DIR (a scored dataset dir) or a --subset to default to")
    if cfg.sweep:
        from curate.train_probe.sweep import read_column

        spec = parse_sweep(cfg.sweep)
        ds, _ = dataset_shards(cfg.sweep_source, "--sweep-source")
        read_column(ds, spec.column)
    if cfg.save_model:
        if len(cfg.subsets) != 1 or cfg.sweep:
            raise InputError("--save-model: saves the model of a single --subset (without --sweep); "
                             f"got {len(cfg.subsets)} subset(s){' and a sweep' if cfg.sweep else ''}")
        if Path(cfg.save_model).is_file() and not cfg.save_model.endswith(".safetensors"):
            raise InputError(f"--save-model: {cfg.save_model} is a file; give X.safetensors or a directory")


def probe_fingerprint(cfg: ProbeConfig, train: TrainConfig) -> tuple[str, dict[str, Any]]:
    inputs = {
        "subsets": {name: dataset_summary(path) for name, path in cfg.subsets},
        "eval": dataset_summary(cfg.eval_dir),
    }
    if cfg.sweep_source:
        inputs["sweep_source"] = dataset_summary(cfg.sweep_source, ("score",))
    return fingerprint(cfg, extra={"train": output_fields(train), "inputs": inputs}), inputs


class _Loader:
    """Loads each dataset dir once, on first use (a fully resumed run decodes nothing)."""

    def __init__(self, train: TrainConfig, workers: int):
        import open_clip

        from curate.train_probe.train import model_config

        self.train, self.workers = train, workers
        self.tokenizer = open_clip.get_tokenizer(model_config(train)[0])
        self._cache: dict[tuple[str, str | None], Any] = {}

    def get(self, path: str, flag: str, label_column: str | None = None) -> Any:
        from curate.train_probe.data import load_samples

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
                                      "seeds": cfg.seeds, "alias": None} for n, p in cfg.subsets]
    if cfg.sweep:
        from curate.train_probe.sweep import parse_sweep, read_column, sweep_subsets

        spec = parse_sweep(cfg.sweep)
        keys, values = read_column(DatasetDir.at(cfg.sweep_source), spec.column)
        available = set(loader.get(cfg.sweep_source, "--sweep-source").keys)
        same = [n for n, p in cfg.subsets if p == cfg.sweep_source]
        for s in sweep_subsets(keys, values, spec, available):
            alias = same[0] if s["kind"] == "all" and same else None
            subsets.append({**s, "path": cfg.sweep_source, "seeds": cfg.sweep_seeds, "alias": alias})
    return subsets


def run_probe(cfg: ProbeConfig, train: TrainConfig, out: str | Path, *, redo: bool = False) -> dict[str, Any]:
    """Run (or resume) the experiment and write the outputs; returns the results object."""
    from curate.train_probe.evaluate import chance_level, evaluate_model
    from curate.train_probe.report import write_outputs
    from curate.train_probe.train import (
        model_config,
        resolve_device,
        save_model,
        saved_model_paths,
        train_run,
    )

    check_inputs(cfg, train)
    out = Path(out).expanduser().resolve()
    out_ds = DatasetDir.at(out)
    fp, inputs = probe_fingerprint(cfg, train)
    if check_fingerprint(out_ds, STAGE, fp, redo):
        for f in (out / "runs").glob("*.json") if (out / "runs").exists() else []:
            f.unlink()
    if out.exists():
        clean_tmp(out)
    config = {"probe": to_dict(cfg), "train": to_dict(train)}
    record_stage(out_ds, STAGE, config=config, fingerprint=fp, inputs=inputs, status="running")

    device = resolve_device(train.device)
    loader = _Loader(train, cfg.workers)
    subsets = plan_subsets(cfg, loader)
    eval_set = None

    def evaluate(model: Any, tokenizer: Any) -> dict[str, float]:
        return evaluate_model(model, tokenizer, eval_set, device)

    runs: list[dict[str, Any]] = []
    trained = skipped = 0
    for sub in subsets:
        if sub["alias"]:
            runs += [{**r, "subset": sub["name"], "kind": sub["kind"], "fraction": sub["fraction"], "alias": sub["alias"]}
                     for r in list(runs) if r["subset"] == sub["alias"]]
            continue
        for seed in range(sub["seeds"]):
            path = run_file(out, sub["name"], seed)
            save_here = bool(cfg.save_model) and seed == 0
            if path.exists():
                prev = read_json(path)
                if prev.get("fingerprint") == fp and (not save_here or saved_model_paths(cfg.save_model)[0].exists()):
                    runs.append(prev["result"])
                    skipped += 1
                    continue
            if eval_set is None:
                eval_set = loader.get(cfg.eval_dir, "--eval", cfg.label_column)
            samples = loader.get(sub["path"], "--sweep-source" if sub["keys"] is not None else "--subset")
            if sub["keys"] is not None:
                samples = samples.select_keys(sub["keys"])
            model, result = train_run(samples, train, seed, evaluate=evaluate, device=device)
            result = {"subset": sub["name"], "kind": sub["kind"], "fraction": sub["fraction"], **result}
            if save_here:
                weights, conf_path = save_model(model, model_config(train)[1], cfg.save_model)
                result["saved_model"] = {"weights": str(weights), "config": str(conf_path)}
            write_json(path, {"fingerprint": fp, "result": result})
            log.info("%s seed %d: zero-shot top-1 %.3f, i2t R@1 %.3f (%d samples seen, %.2f epochs, %.1fs)",
                     sub["name"], seed, result.get("zeroshot_top1", float("nan")), result.get("i2t_r1", float("nan")),
                     result["samples_seen"], result["epochs"], result["train_seconds"])
            runs.append(result)
            trained += 1
    if eval_set is None:
        eval_set = loader.get(cfg.eval_dir, "--eval", cfg.label_column)
    chance = chance_level(eval_set)
    column = cfg.sweep.partition("=")[0].strip() if cfg.sweep else None
    results = write_outputs(out, config=config, runs=runs, subsets=subsets, chance=chance, sweep_column=column)
    counts = {"runs": len(runs), "trained": trained, "resumed": skipped, "eval_samples": len(eval_set),
              "eval_classes": len(set(eval_set.labels or []))}
    record_stage(out_ds, STAGE, config=config, fingerprint=fp, inputs=inputs, counts=counts)
    results["counts"] = counts
    return results
