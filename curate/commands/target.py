"""`curate target-filter DIR --target TARGET`: DataComp image-based filtering signals (clusters near a target set)."""

from __future__ import annotations

from typing import Any

import click

from curate.commands.common import engine_options, finish
from curate.options import Options, options_from
from curate.runner import run_stage


@options_from("curate.stages.target:TargetConfig", "target-filter")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--progress/--no-progress", default=True, show_default=True)
@engine_options
def command(dataset: str, progress: bool, options: Options, engine_spec: Any, redo: bool) -> None:
    """Cluster the image embeddings of DATASET, select the clusters nearest to TARGET's images and write
    signals/target (`target_selected`); then `curate export DATASET --out OUT --policy datacomp-image`."""
    summary = run_stage("target", options.build(), dataset, engine_spec, redo=redo, progress=progress)
    c = summary.counts
    finish(summary, [f"  clusters {c.get('clusters', 0)}, selected {c.get('selected_clusters', 0)} "
                     f"(nearest to {c.get('target_images', 0)} target images); samples selected "
                     f"{c.get('selected', 0)} of {c.get('assigned', 0)}"])
