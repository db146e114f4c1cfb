"""`curate report DIR --out report.html`: one self-contained HTML page about a dataset and its curation."""

from __future__ import annotations

import functools
from pathlib import Path

import click


@click.command("report")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="The HTML file to write.")
@click.option("--export-dir", type=click.Path(file_okay=False), default=None,
              help="An export of DIR (curate export --out): kept vs dropped, the per-clause funnel.")
@click.option("--probe-dir", "probe_dirs", type=click.Path(file_okay=False), multiple=True,
              help="A curate train-probe output folder (results.json, results.md, *.png); repeatable, one section "
                   "each (e.g. a comparison and a --budgets study).")
@click.option("--ground-truth", type=click.Path(dir_okay=False), default=None,
              help="The demo web's ground_truth.parquet: precision/recall of each curation step.")
@click.option("--grid-size", type=click.IntRange(1, 200), default=24, show_default=True,
              help="Thumbnails per sample grid.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random sample grids.")
@click.option("--summary/--no-summary", default=True, show_default=True,
              help="Also print a one-screen summary: funnel, accuracy vs ground truth, train-probe table.")
def command(directory: str, out: str, export_dir: str | None, probe_dirs: tuple[str, ...], ground_truth: str | None,
            grid_size: int, seed: int, summary: bool) -> None:
    """Funnel, clip_score and language histograms, sample grids, duplicate groups, download health,
    train-probe results and accuracy against ground truth, in a single HTML file (no network needed).

    DIR is the downloaded (and scored, deduplicated) dataset; an export dir given as DIR stands for its
    source dataset plus itself."""
    import os

    from curate.demo.ground_truth import accuracy_section
    from curate.report.report import ReportOptions, build_report

    collected: dict = {}
    section = None if ground_truth is None else functools.partial(accuracy_section, Path(ground_truth))
    path = build_report(directory, out, export_dir=export_dir, probe_dir=list(probe_dirs) or None,
                        ground_truth=section, options=ReportOptions(grid_size=grid_size, seed=seed),
                        collect=collected)
    if summary:
        click.echo(one_screen_summary(collected, directory, export_dir, probe_dirs, ground_truth))
    click.echo(f"report: {os.path.abspath(path)} ({os.path.getsize(path) / 1024:.0f} KiB)")


def one_screen_summary(collected: dict, directory: str, export_dir: str | None,
                       probe_dir: str | tuple[str, ...] | list[str] | None, ground_truth: str | None) -> str:
    """The funnel, the curation accuracy against ground truth and the train-probe table, as plain text."""
    from pathlib import Path

    lines = ["", "== funnel =="]
    for label, n, why in collected.get("funnel", []):
        lines.append(f"  {label:<26} {n:>8,}  {why}")
    if ground_truth:
        from curate.demo.ground_truth import curation_accuracy, format_accuracy

        lines += ["", "== " + format_accuracy(curation_accuracy(directory, ground_truth, export_dir))]
    dirs = [probe_dir] if isinstance(probe_dir, str) else list(probe_dir or [])
    for d in dirs:
        results = Path(d) / "results.json"
        if not results.exists():
            continue
        import json

        from curate.train_probe.report import summary_lines

        try:
            probe = summary_lines(json.loads(results.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as e:
            probe = [f"  {results}: unreadable ({e})"]
        if probe:
            lines += ["", "== train-probe" + (f" ({Path(d).name})" if len(dirs) > 1 else "") + " ==", *probe]
    return "\n".join(lines) + "\n"
