"""`curate score DIR`: CLIP score, embeddings, language and caption signals for every downloaded shard."""

from __future__ import annotations

import os
from typing import Any

import click
from click.core import ParameterSource

from curate.commands.common import echo_err, engine_options, finish, resolve_shard_index
from curate.models import DEFAULT_MODEL, DEFAULT_PRETRAINED


@click.command("score")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="open_clip architecture name (e.g. ViT-B-32, curate-tiny) or a model config .json path.")
@click.option("--pretrained", default=DEFAULT_PRETRAINED, show_default=True,
              help="open_clip pretrained tag (downloaded by open_clip), a local .safetensors/.pt checkpoint "
                   "(offline), or 'none' for seeded random init.")
@click.option("--checksum", default=None, help="SHA-256 the checkpoint file must have.")
@click.option("--name", default="score", show_default=True,
              help="Scorer name: outputs go to signals/NAME/ with their own manifest entry and fingerprint, "
                   "so several models can score one dataset (lowercase identifier; not a stage name).")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda or cuda:N. cuda with the local engine uses every visible GPU (one worker "
                   "process each, unless --workers is given); on Spark each task uses the GPU Spark assigned it.")
@click.option("--decoder", type=click.Choice(["auto", "cpu", "device"]), default="auto", show_default=True,
              help="JPEG decoding: cpu = Pillow in the loader workers; device = torchvision/nvjpeg on the GPU, "
                   "batched (other formats still decode on the CPU); auto = device on CUDA when nvjpeg works.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Autocast dtype for the encoders (fp16/bf16 are meant for GPUs).")
@click.option("--batch-size", type=int, default=0, show_default=True,
              help="Images per forward pass (0 = by device: 256 on the CPU, up to 1024 by GPU memory).")
@click.option("--loader-workers", type=int, default=-1, show_default=True,
              help="DataLoader processes per task, each reading a disjoint part of the tar "
                   "(0 = in the task's process; -1 = 1 on the CPU, the cores per GPU minus 2 (max 8) on a GPU).")
@click.option("--threads", type=int, default=0, show_default=True,
              help="torch intra-op threads per task process (0 = on CPU, the cores left after --loader-workers).")
@click.option("--save-text-embeddings", is_flag=True, help="Also write signals/score/{shard}.txt_emb.npy.")
@click.option("--shard-index", type=int, default=None, help="This task's slice: shards[INDEX::NUM] "
              "(default: $SLURM_ARRAY_TASK_ID when --num-shards is given, else 0).")
@click.option("--num-shards", type=int, default=1, show_default=True, help="How many slices there are.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@engine_options
def command(dataset: str, model: str, pretrained: str, checksum: str | None, name: str, device: str,
            decoder: str, precision: str, batch_size: int, loader_workers: int, threads: int,
            save_text_embeddings: bool, shard_index: int | None, num_shards: int, progress: bool,
            engine_spec: Any, redo: bool) -> None:
    """Score the downloaded shards of DATASET (resumable per shard)."""
    from curate.models import check_loadable, resolve_model
    from curate.runner import run_stage
    from curate.stages.score import ScoreConfig, check_config, model_inputs, resolve_device

    shard_index = resolve_shard_index(shard_index, num_shards)
    # paths are made absolute: tasks may run in other processes or on other machines
    if model.endswith(".json") or os.sep in model:
        model = os.path.abspath(model)
    if os.path.exists(pretrained):
        pretrained = os.path.abspath(pretrained)
    cfg = ScoreConfig(
        model=model, pretrained=pretrained, checksum=checksum, precision=precision, name=name,
        save_text_embeddings=save_text_embeddings, device=device, decoder=decoder, batch_size=batch_size,
        loader_workers=loader_workers, threads=threads, shard_index=shard_index, num_shards=num_shards,
    )
    check_config(cfg)
    inputs = model_inputs(cfg)  # unknown model, missing file, checksum mismatch: exit 2 before any shard
    if inputs.get("filter_quality", {}).get("weak"):
        from curate.train_probe.quality import warning_lines

        for line in warning_lines(inputs["filter_quality"], cfg.pretrained):
            echo_err(line)
    check_loadable(resolve_model(cfg.model, cfg.pretrained, cfg.checksum), resolve_device(cfg.device))
    engine_spec = gpu_workers(engine_spec, device)
    summary = run_stage("score", cfg, dataset, engine_spec, redo=redo, fingerprint_extra=inputs,
                        progress=progress)
    c = summary.counts
    finish(summary, [f"  rows {c.get('rows', 0)}, scored {c.get('scored', 0)}, "
                     f"skipped {dict(sorted((c.get('skipped') or {}).items()))}"])


def gpu_workers(spec: Any, device: str) -> Any:
    """--device cuda/auto on the local engine without an explicit --workers: one worker process per
    visible GPU (each takes the GPU of its pool index, see curate.devices.pick_device)."""
    import dataclasses

    from curate.devices import cuda_count, local_workers

    explicit = click.get_current_context().get_parameter_source("workers") != ParameterSource.DEFAULT
    if spec.name != "local" or explicit or device not in ("cuda", "auto"):
        return spec
    return dataclasses.replace(spec, workers=local_workers(device, spec.workers, explicit, cuda_count()))
