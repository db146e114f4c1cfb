"""`curate run PIPELINE.yaml`: run a declarative pipeline's stages in order, resuming where it stopped."""

from __future__ import annotations

import click

from curate.pipeline import run


@click.command("run")
@click.argument("pipeline", metavar="PIPELINE.yaml", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the resolved plan (one curate command per stage) and exit.")
@click.option("--redo", is_flag=True, help="Pass --redo to every stage (recompute instead of resuming).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a field: workdir=..., services.web.seed=1, score.batch_size=64 (stage id or name).")
@click.option("--engine", type=click.Choice(["local", "spark"]), default=None,
              help="Engine for every stage that has --engine (same as --set defaults.engine=...).")
@click.option("--spark-master", default=None, help="Spark master URL for every stage that has --spark-master.")
@click.option("--workers", type=int, default=None, help="Workers for every stage that has --workers.")
def command(pipeline: str, dry_run: bool, redo: bool, sets: tuple[str, ...], engine: str | None,
            spark_master: str | None, workers: int | None) -> None:
    """Each stage entry's fields are its CLI flags (batch_size -> --batch-size); every stage resumes
    and refuses to resume over a different config, as when run by hand."""
    extra = [f"defaults.{k}={v}" for k, v in
             (("engine", engine), ("spark_master", spark_master), ("workers", workers)) if v is not None]
    run(pipeline, sets=tuple(extra) + sets, dry_run=dry_run, redo=redo,
        echo=lambda msg: click.echo(msg, err=not dry_run))
