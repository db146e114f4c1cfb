"""`curate score DIR`: CLIP score, embeddings, language and caption signals for every downloaded shard."""

from __future__ import annotations

import os
from typing import Any

import click

from curate.commands.common import engine_options, finish
from curate.options import Options, options_from
from curate.runner import run_stage


@options_from("curate.stages.score:ScoreConfig", "score")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--progress/--no-progress", default=True, show_default=True)
@engine_options(array=True)
def command(dataset: str, progress: bool, options: Options, engine_spec: Any, redo: bool) -> None:
    """Score the downloaded shards of DATASET (resumable per shard)."""
    # paths are made absolute: tasks may run in other processes or on other machines
    model, pretrained = options["model"], options["pretrained"]
    if model.endswith(".json") or os.sep in model:
        model = os.path.abspath(model)
    if os.path.exists(pretrained):
        pretrained = os.path.abspath(pretrained)
    cfg = options.build(model=model, pretrained=pretrained)
    # the runner checks the config and the model (exit 2 before any shard), and runs one local worker per
    # visible GPU for --device cuda/auto unless --workers says otherwise
    summary = run_stage("score", cfg, dataset, engine_spec, redo=redo, progress=progress)
    c = summary.counts
    finish(summary, [f"  rows {c.get('rows', 0)}, scored {c.get('scored', 0)}, "
                     f"skipped {dict(sorted((c.get('skipped') or {}).items()))}"])

