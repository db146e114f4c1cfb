"""`curate adopt SRC --out DIR`: make an img2dataset output folder (or webdataset tars) a curate dataset dir."""

from __future__ import annotations

import os
from typing import Any

import click

from curate.commands.common import engine_options, finish
from curate.errors import CurateError
from curate.options import Options, options_from
from curate.runner import run_stage


@options_from("curate.stages.adopt:AdoptConfig", "adopt", after="out")
@click.argument("source", metavar="SRC", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The new curate dataset directory.")
@engine_options
def command(source: str, out: str, options: Options, engine_spec: Any, redo: bool) -> None:
    """SRC is img2dataset's output folder ({shard}.tar + {shard}.parquet + {shard}_stats.json, or its files
    and parquet output formats) or a folder of webdataset .tar files. Every source row gets a ledger row;
    score, dedup, export, report and train-probe then work on DIR as on a downloaded one."""
    cfg = options.build(source=os.path.abspath(source))
    # the source's file fingerprint is recorded (manifest inputs) but not part of the config fingerprint:
    # a shard fixed or added in the source is adopted by a rerun, while done shards stay done
    summary = run_stage("adopt", cfg, out, engine_spec, redo=redo)
    c = summary.counts
    dup = c.get("duplicate_keys") or []
    lines = [f"adopt: {c.get('rows', 0)} row(s), {c.get('success', 0)} with images, "
             f"{c.get('linked', 0)} of {summary.shards_total} tar(s) hard-linked, "
             f"{c.get('copied_bytes', 0)} byte(s) copied"]
    if dup and summary.ok:
        raise CurateError(f"adopt: key(s) appear in more than one shard: {', '.join(dup)}; every curate key must be "
                          f"unique. Rename the keys in the source tars, or adopt the folders separately.")
    finish(summary, lines)
