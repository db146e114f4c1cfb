"""`curate index DIR`: a FAISS index over the scored embeddings of DIR, chosen by size (see curate/search/build.py)."""

from __future__ import annotations

from typing import Any

import click

from curate.commands.common import engine_options, finish


@click.command("index")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--scorer", default="score", show_default=True,
              help="The score stage whose embeddings (signals/NAME/) are indexed.")
@click.option("--kind", type=click.Choice(["auto", "flat", "ivf-fp16", "ivf-pq"]), default="auto", show_default=True,
              help="auto: exact Flat under --exact-below rows; above, IVF with float16 lists when they fit "
                   "--memory-budget, else IVF with product quantization sized to it.")
@click.option("--memory-budget", default="4G", show_default=True,
              help="Memory one modality's index may take (e.g. 512M, 4G).")
@click.option("--exact-below", type=int, default=100_000, show_default=True,
              help="Rows under which the index is exact (brute force).")
@click.option("--nlist", type=int, default=0, show_default=True, help="IVF lists (0: a power of two near sqrt(N)).")
@click.option("--train-size", type=int, default=0, show_default=True,
              help="Rows of the seeded training sample (0: 64 per IVF list).")
@click.option("--target-recall", type=float, default=0.97, show_default=True,
              help="recall@10 against brute force (held-out rows) the chosen nprobe must reach.")
@click.option("--queries", type=int, default=256, show_default=True, help="Held-out rows for the recall estimate.")
@click.option("--text/--no-text", default=True, show_default=True,
              help="Also index text embeddings when the scorer saved them (--save-text-embeddings).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@engine_options
def command(dataset: str, scorer: str, kind: str, memory_budget: str, exact_below: int, nlist: int,
            train_size: int, target_recall: float, queries: int, text: bool, seed: int, progress: bool,
            engine_spec: Any, redo: bool) -> None:
    """Build (or resume) the search index of DATASET from its scored embeddings."""
    from curate.io.layout import DatasetDir
    from curate.runner import run_stage
    from curate.search.build import IndexConfig, check_config, input_digest, parse_bytes

    cfg = IndexConfig(scorer=scorer, kind=kind, memory_budget=parse_bytes(memory_budget), exact_below=exact_below,
                      nlist=nlist, train_size=train_size, seed=seed, target_recall=target_recall, queries=queries,
                      text=text)
    check_config(cfg)
    extra = {"dataset": input_digest(DatasetDir.at(dataset), scorer)}
    summary = run_stage("index", cfg, dataset, engine_spec, redo=redo, fingerprint_extra=extra, progress=progress)
    c = summary.counts
    line = (f"  rows {c.get('rows', 0)}, {c.get('factory', '?')} ({c.get('kind', '?')}), nprobe {c.get('nprobe')}, "
            f"recall@10 {c.get('recall_at_10')}, {c.get('index_bytes', 0) / 1e6:.1f} MB")
    finish(summary, [line])
