"""Parquet reading and writing for ledgers and signal tables (atomic writes, one file per shard)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curate.io.atomic import atomic_path


def write_table(path: str | os.PathLike, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_tables(paths: Sequence[Path], columns: Sequence[str] | None = None) -> pa.Table:
    """Concatenate per-shard tables (schemas unified, missing columns null)."""
    tables = [pq.read_table(p, columns=list(columns) if columns else None) for p in paths]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="default")
