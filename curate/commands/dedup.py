"""`curate dedup DIR`: exact and near-duplicate groups over the scored image embeddings, and eval contamination."""

from __future__ import annotations

from typing import Any

import click

from curate.commands.common import engine_options, finish
from curate.options import Options, options_from
from curate.runner import run_stage


@options_from("curate.stages.dedup:DedupConfig", "dedup")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--progress/--no-progress", default=True, show_default=True)
@engine_options
def command(dataset: str, progress: bool, options: Options, engine_spec: Any, redo: bool) -> None:
    """Find duplicate groups in the scored samples of DATASET and pick one sample to keep per group."""
    cfg = options.build()
    summary = run_stage("dedup", cfg, dataset, engine_spec, redo=redo, progress=progress)
    c = summary.counts
    line = (f"  rows {c.get('rows', 0)}, threshold {c.get('threshold')}, clusters {c.get('clusters', 0)}, "
            f"exact_duplicates {c.get('exact_duplicates', 0)}, near_duplicate_pairs {c.get('near_duplicate_pairs', 0)}, "
            f"groups {c.get('groups', 0)}, duplicates {c.get('duplicates', 0)}")
    if c.get("drops_by_evidence"):
        line += ", drops by evidence " + ", ".join(f"{k} {v}" for k, v in c["drops_by_evidence"].items())
    if cfg.against:
        line += f", eval_contaminated {c.get('eval_contaminated', 0)}"
    finish(summary, [line])
