"""Options every stage command shares (engine, workers, redo) and the summary printer."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from curate.engines import EngineSpec
from curate.errors import CurateError, InputError


def engine_options(fn: Callable | None = None, *, array: bool = False) -> Callable:
    """The engine flags of a stage command, folded into one `engine_spec` argument (an EngineSpec); with
    `array=True` also --shard-index/--num-shards, for a stage whose tasks may be split over a Slurm array."""
    if fn is None:
        return functools.partial(engine_options, array=array)
    if array:
        fn = _array_options(fn)

    @click.option("--engine", type=click.Choice(["local", "spark"]), default="local", show_default=True,
                  help="Where shard tasks run.")
    @click.option("--workers", type=int, default=None,
                  help="Local worker processes (1 runs in-process). Default: 1, one per CPU "
                       "for download, one per visible GPU for a stage whose tasks take a GPU (score --device "
                       "cuda/auto).")
    @click.option("--spark-master", default="local[*]", show_default=True,
                  help="Spark master URL for --engine spark (an active SparkSession is reused).")
    @click.option("--redo", is_flag=True, help="Discard this stage's earlier output and recompute.")
    @functools.wraps(fn)
    def wrapper(*args: Any, engine: str, workers: int | None, spark_master: str, **kw: Any) -> Any:
        if workers is not None and workers < 1:
            raise click.BadParameter("must be at least 1", param_hint="--workers")
        num = kw.pop("num_shards", 1)
        index = resolve_shard_index(kw.pop("shard_index", None), num)
        return fn(*args, engine_spec=EngineSpec(engine, workers, spark_master, index, num), **kw)

    return wrapper


def _array_options(fn: Callable) -> Callable:
    fn = click.option("--num-shards", type=int, default=1, show_default=True,
                      help="How many tasks a Slurm array has: this run does every NUM-th planned task.")(fn)
    return click.option("--shard-index", type=int, default=None,
                        help="This array task's slice of the planned tasks: tasks[INDEX::NUM] (default: "
                             "$SLURM_ARRAY_TASK_ID when --num-shards is given, else 0).")(fn)


def finish(summary: Any, extra_lines: list[str] | None = None) -> None:
    """Print a stage summary; a failed shard makes the command exit non-zero."""
    click.echo(
        f"{summary.stage}: {summary.shards_done} shard(s) done, {summary.shards_skipped} already done, "
        f"{len(summary.failed)} failed, {summary.seconds:.1f}s -> {summary.root}",
        err=True,
    )
    for line in extra_lines or []:
        click.echo(line, err=True)
    if summary.failed:
        for shard, err in sorted(summary.failed.items()):
            click.echo(f"  shard {shard} FAILED: {(err or '').splitlines()[0]}", err=True)
        raise ShardsFailed(f"{len(summary.failed)} shard(s) of stage '{summary.stage}' failed", summary)


class ShardsFailed(CurateError):
    exit_code = 3

    def __init__(self, msg: str, summary: Any = None):
        super().__init__(msg)
        self.summary = summary  # the stage's StageSummary: which shards failed, and why


def echo_err(msg: str) -> None:
    click.echo(msg, err=True)
    sys.stderr.flush()


def resolve_shard_index(shard_index: int | None, num_shards: int) -> int:
    """--shard-index, or the Slurm array task id when --num-shards > 1 and no index is given."""
    if shard_index is not None:
        return shard_index
    env = os.environ.get("SLURM_ARRAY_TASK_ID") if num_shards > 1 else None
    try:
        return int(env) if env else 0
    except ValueError:
        raise InputError(f"--shard-index: SLURM_ARRAY_TASK_ID='{env}' is not an integer") from None
