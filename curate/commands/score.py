"""`curate score DIR`: CLIP score, embeddings, language and caption signals for every downloaded shard."""

from __future__ import annotations

import os
from typing import Any

import click
from click.core import ParameterSource

from curate.commands.common import echo_err, engine_options, finish, resolve_shard_index
from curate.options import Options, options_from


@options_from("curate.stages.score:ScoreConfig", "score")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--progress/--no-progress", default=True, show_default=True)
@engine_options
def command(dataset: str, progress: bool, options: Options, engine_spec: Any, redo: bool) -> None:
    """Score the downloaded shards of DATASET (resumable per shard)."""
    from curate.models import check_loadable, resolve_model
    from curate.runner import run_stage
    from curate.stages.score import check_config, model_inputs, resolve_device

    # paths are made absolute: tasks may run in other processes or on other machines
    model, pretrained = options["model"], options["pretrained"]
    if model.endswith(".json") or os.sep in model:
        model = os.path.abspath(model)
    if os.path.exists(pretrained):
        pretrained = os.path.abspath(pretrained)
    cfg = options.build(model=model, pretrained=pretrained,
                        shard_index=resolve_shard_index(options["shard_index"], options["num_shards"]))
    check_config(cfg)
    inputs = model_inputs(cfg)  # unknown model, missing file, checksum mismatch: exit 2 before any shard
    if inputs.get("filter_quality", {}).get("weak"):
        from curate.train_probe.quality import warning_lines

        for line in warning_lines(inputs["filter_quality"], cfg.pretrained):
            echo_err(line)
    check_loadable(resolve_model(cfg.model, cfg.pretrained, cfg.checksum), resolve_device(cfg.device))
    engine_spec = gpu_workers(engine_spec, cfg.device)
    summary = run_stage("score", cfg, dataset, engine_spec, redo=redo, fingerprint_extra=inputs,
                        progress=progress)
    c = summary.counts
    finish(summary, [f"  rows {c.get('rows', 0)}, scored {c.get('scored', 0)}, "
                     f"skipped {dict(sorted((c.get('skipped') or {}).items()))}"])


def gpu_workers(spec: Any, device: str) -> Any:
    """--device cuda/auto on the local engine without an explicit --workers: one worker process per
    visible GPU (each takes the GPU of its pool index, see curate.devices.pick_device)."""
    import dataclasses

    from curate.devices import local_workers

    explicit = click.get_current_context().get_parameter_source("workers") != ParameterSource.DEFAULT
    if spec.name != "local" or explicit or device not in ("cuda", "auto"):
        return spec
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return dataclasses.replace(spec, workers=local_workers(device, spec.workers, explicit, n))
