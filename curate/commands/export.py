"""`curate export DIR --out OUT`: select samples by SQL clauses and policies, reshard them with their original bytes."""

from __future__ import annotations

import os
from typing import Any

import click

from curate.commands.common import engine_options, finish
from curate.io.layout import DatasetDir
from curate.io.publish import is_remote, local_path, publish, staging_dir
from curate.options import Options, options_from
from curate.runner import lend, run_stage


@options_from("curate.stages.export:ExportConfig", "export", after="staging")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--out", required=True, help="The new dataset directory: a local path or any fsspec URL "
              "(s3://..., gs://...; written to a local staging dir, then published shard by shard).")
@click.option("--staging", default=None, type=click.Path(file_okay=False),
              help="Local staging folder for a remote --out (default: ~/.cache/curate/staging/HASH).")
@click.option("--dry-run", is_flag=True, help="Print how many rows each clause removes, then exit without writing.")
@engine_options(array=True)
def command(directory: str, out: str, staging: str | None, dry_run: bool, options: Options, engine_spec: Any,
            redo: bool) -> None:
    """Clauses apply in order: downloaded (status = 'success'), each --policy, each --where, then
    --top-fraction. Predicates run in DuckDB, or in Spark SQL with --engine spark (same text)."""
    from curate.stages.export import format_counts, select

    cfg = options.build(source=os.path.abspath(directory))
    if cfg.top_fraction == "auto":
        from curate.stages.export import auto_fraction

        a = auto_fraction(cfg)
        note = "within the fit's error" if a["within_fit_error"] else "beyond the fit's RMSE"
        click.echo(f"export: --top-fraction auto -> {a['fraction']:g} by {cfg.by or a['column']} at {cfg.budget} "
                   f"samples seen (predicted {a['fit']['metric']} {a['predicted'][str(a['fraction'])]:.4f}; margin "
                   f"over {a['runner_up']:g}: {a['margin_over_runner_up']:.4f}, {note}"
                   f"{'; extrapolated beyond the studied budgets' if a['extrapolated'] else ''}; study {a['study']})",
                   err=True)
    if dry_run:
        with lend(engine_spec):  # the counts run on the engine's SQL back end, as the export's selection would
            click.echo(format_counts(select(cfg)))
        return

    target = staging_dir(out, staging) if is_remote(out) else local_path(out)
    summary = run_stage("export", cfg, str(target), engine_spec, redo=redo)
    if is_remote(out):
        ds = DatasetDir.at(target)
        if cfg.layout == "img2dataset":
            from curate.stages.img2dataset_layout import publish_img2dataset

            publish_img2dataset(ds.root, out, ds.done_shards("export"))
        n = publish(ds, out, "export")
        click.echo(f"export: published {n} shard(s) to {out} (staged in {target})", err=True)
    counts = summary.counts
    finish(summary, [f"export: kept {counts.get('kept', 0)} of {counts.get('input', 0)} rows "
                     f"in {counts.get('shards', 0)} shard(s)"])
