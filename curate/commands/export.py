"""`curate export DIR --out OUT`: select samples by SQL clauses and policies, reshard them with their original bytes."""

from __future__ import annotations

import click

from curate.commands.common import engine_options, finish


@click.command("export")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--out", required=True, help="The new dataset directory: a local path or any fsspec URL "
              "(s3://..., gs://...; written to a local staging dir, then published shard by shard).")
@click.option("--staging", default=None, type=click.Path(file_okay=False),
              help="Local staging folder for a remote --out (default: ~/.cache/curate/staging/HASH).")
@click.option("--where", "where", multiple=True, metavar="SQL",
              help="A SQL predicate over the samples view (ledger + score + dedup columns); repeatable.")
@click.option("--policy", "policy", multiple=True, metavar="NAME|FILE",
              help="A built-in policy (laion, datacomp-basic, clip-top30, dedup, demo) or a policy YAML file; "
                   "repeatable, applied in order.")
@click.option("--top-fraction", type=float, default=None, help="Keep this fraction of the rows left, ranked by --by.")
@click.option("--by", default=None, metavar="COLUMN", help="The column (SQL expression) --top-fraction ranks by.")
@click.option("--samples-per-shard", type=int, default=10000, show_default=True, help="Samples per output tar.")
@click.option("--layout", type=click.Choice(["curate", "img2dataset"]), default="curate", show_default=True,
              help="curate: shards/ + ledger/ (a curate dataset dir). img2dataset: flat {shard}.tar, {shard}.parquet "
                   "and {shard}_stats.json as img2dataset writes them (readable by its tools, and by `curate adopt`).")
@click.option("--write-dropped", is_flag=True, help="Write OUT/dropped.parquet: every dropped key and its clause.")
@click.option("--dry-run", is_flag=True, help="Print how many rows each clause removes, then exit without writing.")
@click.option("--shard-index", type=int, default=0, show_default=True,
              help="With --num-shards: write only output shards i with i %% num_shards == shard-index (Slurm arrays).")
@click.option("--num-shards", type=int, default=1, show_default=True, help="Number of slices (see --shard-index).")
@engine_options
def command(directory: str, out: str, where: tuple[str, ...], policy: tuple[str, ...], top_fraction: float | None,
            by: str | None, samples_per_shard: int, layout: str, write_dropped: bool, dry_run: bool, shard_index: int,
            num_shards: int, staging: str | None, engine_spec, redo: bool) -> None:
    """Clauses apply in order: downloaded (status = 'success'), each --policy, each --where, then
    --top-fraction. Predicates run in DuckDB, or in Spark SQL with --engine spark (same text)."""
    import os

    from curate.runner import run_stage
    from curate.stages.export import ExportConfig, fingerprint_extra, format_counts, select

    cfg = ExportConfig(
        source=os.path.abspath(directory), where=where, policy=policy, top_fraction=top_fraction, by=by,
        samples_per_shard=samples_per_shard, write_dropped=write_dropped, layout=layout, query_engine=engine_spec.name,
        spark_master=engine_spec.spark_master, shard_index=shard_index, num_shards=num_shards,
    )
    if dry_run:
        click.echo(format_counts(select(cfg)))
        return
    from curate.io.publish import is_remote, local_path, publish, staging_dir

    target = staging_dir(out, staging) if is_remote(out) else local_path(out)
    summary = run_stage("export", cfg, str(target), engine_spec, redo=redo, fingerprint_extra=fingerprint_extra(cfg))
    if is_remote(out):
        from curate.io.layout import DatasetDir

        ds = DatasetDir.at(target)
        if layout == "img2dataset":
            from curate.stages.img2dataset_layout import publish_img2dataset

            publish_img2dataset(ds.root, out, ds.done_shards("export"))
        n = publish(ds, out, "export")
        click.echo(f"export: published {n} shard(s) to {out} (staged in {target})", err=True)
    counts = summary.counts
    finish(summary, [f"export: kept {counts.get('kept', 0)} of {counts.get('input', 0)} rows "
                     f"in {counts.get('shards', 0)} shard(s)"])
