"""`curate dedup DIR`: exact and near-duplicate groups over the scored image embeddings, and eval contamination."""

from __future__ import annotations

import os
from typing import Any

import click

from curate.commands.common import engine_options, finish, parse_k


def _threshold(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"'{value}' is not 'auto' or a cosine", param_hint="--threshold") from None


@click.command("dedup")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--threshold", default="0.95", show_default=True,
              help="Cosine at or above which two images are near duplicates, or 'auto': calibrate it for the "
                   "scoring model on augmented copies (re-encoded, downscaled, cropped) of a sample of the "
                   "dataset's own images, above every random pair of that sample. 0.95 suits CLIP ViT image "
                   "embeddings; a small or weakly trained model needs another value (or 'auto').")
@click.option("--auto-target", type=float, default=0.95, show_default=True,
              help="With --threshold auto: the share of augmented copies the threshold must find.")
@click.option("--k", "k", default="auto", show_default=True,
              help="k-means clusters, or 'auto' (about 2 sqrt(N): 1M samples -> 2000 clusters).")
@click.option("--probes", type=int, default=2, show_default=True,
              help="Nearest clusters each sample searches, so pairs split by a cluster border are found.")
@click.option("--keep", type=click.Choice(["best-clip-score", "farthest-from-centroid", "first"]),
              default="best-clip-score", show_default=True,
              help="Which sample of a duplicate group is kept (ties: lowest key).")
@click.option("--against", type=click.Path(exists=True, file_okay=False), default=None,
              help="A scored evaluation dataset dir: flag samples close to (or byte-equal to) its images.")
@click.option("--eval-threshold", type=float, default=0.95, show_default=True,
              help="Cosine to an evaluation image at or above which a sample is eval_contaminated.")
@click.option("--phash", is_flag=True, help="Also group images with equal perceptual hashes (reads the tars).")
@click.option("--phash-distance", type=int, default=-1, show_default=True,
              help="With --phash: a near (embedding) pair counts only when the two images' 256-bit pHashes "
                   "differ in at most this many bits (-1: no check; the demo uses 8).")
@click.option("--seed", type=int, default=0, show_default=True, help="k-means sample and init seed.")
@click.option("--tasks", type=int, default=0, show_default=True,
              help="Pair-search tasks (groups of clusters) for the engine (0 = one per ~65k samples).")
@click.option("--scorer", default="score", show_default=True,
              help="The score stage whose image embeddings are compared (signals/SCORER/, `curate score --name`).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where k-means, assignment and pair search run: cuda uses torch matrix products on the GPU "
                   "(same decisions as cpu, which uses faiss/numpy).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@engine_options
def command(dataset: str, threshold: str, auto_target: float, k: str, probes: int, keep: str, against: str | None,
            eval_threshold: float, phash: bool, phash_distance: int, seed: int, tasks: int, scorer: str, device: str, progress: bool, engine_spec: Any,
            redo: bool) -> None:
    """Find duplicate groups in the scored samples of DATASET and pick one sample to keep per group."""
    from curate.io.layout import DatasetDir
    from curate.runner import run_stage
    from curate.stages.dedup import DedupConfig, check_config, input_digest

    auto = threshold.strip().lower() == "auto"
    cfg = DedupConfig(threshold=0.95 if auto else _threshold(threshold), threshold_auto=auto,
                      auto_target=auto_target, k=parse_k(k), probes=probes, keep=keep, seed=seed, against=os.path.abspath(against) if against else None, eval_threshold=eval_threshold,
                      phash=phash, phash_distance=phash_distance, tasks=tasks, scorer=scorer, device=device)
    check_config(cfg)
    extra = {"dataset": input_digest(DatasetDir.at(dataset), cfg.scorer)}
    if cfg.against:
        extra["against"] = input_digest(DatasetDir.at(cfg.against), cfg.scorer)
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
