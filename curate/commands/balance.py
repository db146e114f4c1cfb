"""`curate balance DIR`: MetaCLIP-style metadata balancing signals (match captions to entries, rank per entry)."""

from __future__ import annotations

from typing import Any

import click

from curate.commands.common import engine_options, finish
from curate.options import Options, options_from
from curate.runner import run_stage


@options_from("curate.stages.balance:BalanceConfig", "balance")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--progress/--no-progress", default=True, show_default=True)
@engine_options
def command(dataset: str, progress: bool, options: Options, engine_spec: Any, redo: bool) -> None:
    """Match the captions of DATASET against metadata entries and write signals/balance: a pair is kept by
    MetaCLIP balancing with cap t when `balance_rank < t` (each entry keeps at most t of its pairs, chosen
    at random for the seed; entries with at most t pairs keep them all). Then e.g.
    `curate export DATASET --out OUT --policy metaclip` or `--where "balance_rank < 100"`."""
    summary = run_stage("balance", options.build(), dataset, engine_spec, redo=redo, progress=progress)
    c = summary.counts
    lines = [f"  pairs {c.get('pairs', 0)}, matched {c.get('matched_pairs', 0)}, "
             f"entries matched {c.get('entries_matched', 0)} of {c.get('entries', 0)}"]
    if c.get("kept_at_t"):
        caps = sorted(c["kept_at_t"].items(), key=lambda tn: int(tn[0]))  # the manifest sorts keys as text
        lines.append("  pairs kept at cap t: " + ", ".join(f"t={t}: {n}" for t, n in caps))
    finish(summary, lines)
