"""`curate dedup DIR`: exact and near-duplicate groups over the scored image embeddings, and eval contamination."""

from __future__ import annotations

from typing import Any

import click

from curate.commands.common import engine_options, finish
from curate.options import Options, options_from


def _threshold(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"'{value}' is not 'auto' or a cosine", param_hint="--threshold") from None


@options_from("curate.stages.dedup:DedupConfig", "dedup", after="threshold")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--threshold", default="0.95", show_default=True,
              help="Cosine at or above which two images are near duplicates, or 'auto': calibrate it for the "
                   "scoring model on augmented copies (re-encoded, downscaled, cropped) of a sample of the "
                   "dataset's own images, above every random pair of that sample. 0.95 suits CLIP ViT image "
                   "embeddings; a small or weakly trained model needs another value (or 'auto').")
@click.option("--progress/--no-progress", default=True, show_default=True)
@engine_options
def command(dataset: str, threshold: str, progress: bool, options: Options, engine_spec: Any, redo: bool) -> None:
    """Find duplicate groups in the scored samples of DATASET and pick one sample to keep per group."""
    from curate.io.layout import DatasetDir
    from curate.runner import run_stage
    from curate.stages.dedup import check_config, input_config

    auto = threshold.strip().lower() == "auto"
    cfg = options.build(threshold=0.95 if auto else _threshold(threshold), threshold_auto=auto)
    check_config(cfg)
    extra = {"dataset": input_config(DatasetDir.at(dataset), cfg.scorer)}
    if cfg.against:
        extra["against"] = input_config(DatasetDir.at(cfg.against), cfg.scorer)
    summary = run_stage("dedup", cfg, dataset, engine_spec, redo=redo, fingerprint_extra=extra, progress=progress)
    c = summary.counts
    line = (f"  rows {c.get('rows', 0)}, threshold {c.get('threshold')}, clusters {c.get('clusters', 0)}, "
            f"exact_duplicates {c.get('exact_duplicates', 0)}, near_duplicate_pairs {c.get('near_duplicate_pairs', 0)}, "
            f"groups {c.get('groups', 0)}, duplicates {c.get('duplicates', 0)}")
    if c.get("drops_by_evidence"):
        line += ", drops by evidence " + ", ".join(f"{k} {v}" for k, v in c["drops_by_evidence"].items())
    if cfg.against:
        line += f", eval_contaminated {c.get('eval_contaminated', 0)}"
    finish(summary, [line])
