"""`curate NAME DATASET`: the command of a registered stage that has no command module of its own.

Its options are the stage config's declared fields (curate/options.py), then `--progress` and the engine
options; it runs the stage through the runner and prints the summary and the stage's counts.
"""

from __future__ import annotations

from typing import Any

import click

from curate.commands.common import engine_options, finish
from curate.options import Options, options_from
from curate.runner import run_stage
from curate.stages import StageEntry, get_stage


def stage_command(entry: StageEntry) -> click.Command:
    """The generic command of `entry` (its config class is imported when the command is first used)."""
    name = entry.name

    @options_from(lambda: get_stage(name).config_cls, entry.command_name)
    @click.argument("dataset", type=click.Path(exists=True, file_okay=False))
    @click.option("--progress/--no-progress", default=True, show_default=True)
    @engine_options
    def command(dataset: str, progress: bool, options: Options, engine_spec: Any, redo: bool) -> None:
        summary = run_stage(name, options.build(), dataset, engine_spec, redo=redo, progress=progress)
        finish(summary, [counts_line(summary.counts)])

    command.help = entry.help or f"Run stage '{name}' on DATASET (resumable per task)."
    return command


def counts_line(counts: dict[str, Any]) -> str:
    """The run's scalar counts as one line: `  rows 12, kept 10`."""
    return "  " + ", ".join(f"{k} {v}" for k, v in counts.items() if isinstance(v, (int, float, str)))
