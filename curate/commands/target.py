"""`curate target-filter DIR --target TARGET`: DataComp image-based filtering signals (clusters near a target set)."""

from __future__ import annotations

import os
from typing import Any

import click

from curate.commands.common import engine_options, finish, parse_k


@click.command("target-filter")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--target", required=True, type=click.Path(exists=True, file_okay=False),
              help="A scored dataset dir of target images (e.g. a trusted seed set; DataComp used ImageNet's "
                   "training images), embedded with the same model as DATASET. Not your evaluation set.")
@click.option("--k", "k", default="auto", show_default=True,
              help="k-means clusters of the pool's image embeddings, or 'auto' (about 2 sqrt(N), at least 40 "
                   "samples each). DataComp used 100,000 for pools of 12.8M to 12.8B.")
@click.option("--seed", type=int, default=0, show_default=True, help="k-means sample and init seed.")
@click.option("--niter", type=int, default=20, show_default=True, help="k-means iterations.")
@click.option("--sample", type=int, default=1_000_000, show_default=True,
              help="At most this many pool samples (a seeded sample, ~256 per cluster) train the k-means; the "
                   "driver holds them in memory (about 3 GB at 768-d).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@engine_options
def command(dataset: str, target: str, k: str, seed: int, niter: int, sample: int, progress: bool,
            engine_spec: Any, redo: bool) -> None:
    """Cluster the image embeddings of DATASET, select the clusters nearest to TARGET's images and write
    signals/target (`target_selected`); then `curate export DATASET --out OUT --policy datacomp-image`."""
    from curate.io.layout import DatasetDir
    from curate.runner import run_stage
    from curate.stages.dedup import input_digest
    from curate.stages.target import TargetConfig, validate

    cfg = TargetConfig(target=os.path.abspath(target), k=parse_k(k), seed=seed, niter=niter, sample=sample)
    validate(cfg, DatasetDir.at(dataset))
    extra = {"dataset": input_digest(DatasetDir.at(dataset)), "target": input_digest(DatasetDir.at(cfg.target))}
    summary = run_stage("target", cfg, dataset, engine_spec, redo=redo, fingerprint_extra=extra, progress=progress)
    c = summary.counts
    finish(summary, [f"  clusters {c.get('clusters', 0)}, selected {c.get('selected_clusters', 0)} "
                     f"(nearest to {c.get('target_images', 0)} target images); samples selected "
                     f"{c.get('selected', 0)} of {c.get('assigned', 0)}"])
