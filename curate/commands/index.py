"""`curate index DIR`: a FAISS index over the scored embeddings of DIR, chosen by size (see curate/search/build.py)."""

from __future__ import annotations

from typing import Any

import click

from curate.commands.common import engine_options, finish
from curate.options import Options, options_from
from curate.runner import run_stage


@options_from("curate.search.build:IndexConfig", "index")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--progress/--no-progress", default=True, show_default=True)
@engine_options
def command(dataset: str, progress: bool, options: Options, engine_spec: Any, redo: bool) -> None:
    """Build (or resume) the search index of DATASET from its scored embeddings."""
    summary = run_stage("index", options.build(), dataset, engine_spec, redo=redo, progress=progress)
    c = summary.counts
    line = (f"  rows {c.get('rows', 0)}, {c.get('factory', '?')} ({c.get('kind', '?')}), image queries: nprobe "
            f"{c.get('nprobe')} recall@10 {c.get('recall_at_10')}; text queries: nprobe {c.get('nprobe_text')} "
            f"recall@10 {c.get('text_recall_at_10')}; {c.get('index_bytes', 0) / 1e6:.1f} MB")
    finish(summary, [line])
