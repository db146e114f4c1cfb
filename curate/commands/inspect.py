"""`curate inspect DIR`: a terminal (or --json) summary of any dataset directory."""

from __future__ import annotations

import json

import click

from curate.inspect import format_summary, summarize


@click.command("inspect")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (for scripts).")
def command(directory: str, as_json: bool) -> None:
    """Stages run and their configs, shards done and pending, counts per status and error code,
    and signal distributions (clip_score quantiles, language shares, duplicate share)."""
    summary = summarize(directory)
    click.echo(json.dumps(summary, indent=2, sort_keys=False, default=str) if as_json else format_summary(summary))
