"""The joined `samples` view (ledger + signals/score + signals/dedup) and clause evaluation over it.

The view and every predicate are plain SQL text run unchanged by DuckDB (local) or Spark SQL
(`--engine spark`), so a policy means the same thing on a laptop and on a cluster.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import InputError
from curate.io.layout import DatasetDir
from curate.io.ledger import LEDGER_FIELDS

SIGNAL_STAGES = ("score", "dedup")
# the columns each signal stage provides (the data contract), to name the stage a predicate needs
STAGE_COLUMNS: dict[str, tuple[str, ...]] = {
    "score": ("scored", "skip_reason", "clip_score", "lang", "lang_prob", "caption_chars", "caption_words",
              "letter_share", "caption_boilerplate", "aspect_ratio", "emb_row"),
    "dedup": ("exact_dup", "dup_group", "is_duplicate", "kept_key", "cluster", "nn_similarity", "nn_key",
              "eval_contaminated", "eval_similarity"),
}
_LEDGER_NAMES = {f.name for f in LEDGER_FIELDS}


@dataclass(frozen=True)
class Clause:
    """One selection step: a SQL predicate (`where`) or the top `top_fraction` of the rows left, by `by`."""

    name: str
    where: str | None = None
    top_fraction: float | None = None
    by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Sources:
    """The parquet files of one dataset dir that make up `samples`, and their column names."""

    files: dict[str, list[Path]]  # "ledger" | "score" | "dedup" -> files
    columns: dict[str, list[str]]

    @classmethod
    def of(cls, ds: DatasetDir, shards: list[str] | None = None) -> Sources:
        ledger = [p for p in ds.ledger_files() if shards is None or p.stem in shards]
        if not ledger:
            raise InputError(f"{ds.root}: no completed ledger shards (ledger/ + _done/download/); "
                             f"run `curate download` first")
        files = {"ledger": ledger}
        for stage in SIGNAL_STAGES + _other_signal_stages(ds):
            found = [p for p in ds.signal_files(stage) if shards is None or p.stem in shards]
            if found:
                files[stage] = found
        columns = {name: _column_names(paths) for name, paths in files.items()}
        return cls(files, columns)

    def select_list(self, quote: str = '"') -> str:
        """The SELECT list of `samples`: the ledger's own fields, then each signal table's columns.

        A signal column shadows a ledger extra column of the same name (an export's ledger carries
        copies of the source signals), but never a ledger field (the ledger is the authority on status).
        """
        signal_cols = {c for t in SIGNAL_STAGES for c in self.columns.get(t, [])}
        seen: set[str] = set()
        parts = []
        for c in self.columns["ledger"]:
            if c in _LEDGER_NAMES or c not in signal_cols:
                parts.append(f"l.{_q(c, quote)}")
                seen.add(c)
        for t in SIGNAL_STAGES:
            for c in self.columns.get(t, []):
                if c != "key" and c not in seen:
                    parts.append(f"{t}.{_q(c, quote)}")
                    seen.add(c)
        for t in self._others():  # other signal tables: columns named <table>_<column>
            for c in self.columns[t]:
                if c != "key":
                    parts.append(f"{t}.{_q(c, quote)} AS {_q(f'{t}_{c}', quote)}")
        return ", ".join(parts)

    def _others(self) -> list[str]:
        return [t for t in self.files if t != "ledger" and t not in SIGNAL_STAGES]

    def view_sql(self, quote: str = '"') -> str:
        """The view definition; `quote` is the identifier quote of the engine (only odd names need it)."""
        tables = [t for t in SIGNAL_STAGES if t in self.files] + self._others()
        joins = "".join(f" LEFT JOIN {t} ON {t}.key = l.key" for t in tables)
        return f"SELECT {self.select_list(quote)} FROM ledger l{joins}"

    def all_columns(self) -> list[str]:
        out: list[str] = []
        for cols in self.columns.values():
            out += [c for c in cols if c not in out]
        return out


def _other_signal_stages(ds: DatasetDir) -> tuple[str, ...]:
    """Signal tables beyond score and dedup (signals/<name>/, e.g. balance, target), by folder name."""
    folder = ds.root / "signals"
    if not folder.is_dir():
        return ()
    return tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in SIGNAL_STAGES
                        and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p.name)))


def _q(name: str, quote: str) -> str:
    # DuckDB quotes identifiers with ", Spark SQL with `; plain names need neither
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else f"{quote}{name}{quote}"


def _column_names(paths: list[Path]) -> list[str]:
    names: list[str] = []
    for p in paths:
        for n in pq.read_schema(p).names:
            if n not in names:
                names.append(n)
    return names


def selection_sql(clauses: list[Clause]) -> str:
    """One row per sample: key, source shard, then per clause a boolean (where) or a double (top)."""
    cols = ["key", "shard"]
    for i, c in enumerate(clauses):
        if c.where is not None:
            cols.append(f"COALESCE(({c.where}), FALSE) AS c{i}")
        else:
            cols.append(f"CAST(({c.by}) AS DOUBLE) AS c{i}")
    return f"SELECT {', '.join(cols)} FROM samples"


# ---------------------------------------------------------------------------------------------- engines

class DuckDBQuery:
    def __init__(self, sources: Sources):
        import duckdb

        self.con = duckdb.connect()
        for name, paths in sources.files.items():
            files = ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths)
            alias = "ledger" if name == "ledger" else name
            self.con.execute(f"CREATE VIEW {alias} AS SELECT * FROM read_parquet([{files}], union_by_name=true)")
        self.con.execute(f"CREATE VIEW samples AS {sources.view_sql()}")

    def arrow(self, sql: str) -> pa.Table:
        rel = self.con.sql(sql)
        return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()

    def close(self) -> None:
        self.con.close()


class SparkQuery:
    def __init__(self, sources: Sources, master: str = "local[*]"):
        from curate.engines.spark import get_session

        self.spark = get_session(master)
        for name, paths in sources.files.items():
            df = self.spark.read.option("mergeSchema", "true").parquet(*[str(p) for p in paths])
            df.createOrReplaceTempView(name)
        self.spark.sql(f"CREATE OR REPLACE TEMP VIEW samples AS {sources.view_sql('`')}")

    def arrow(self, sql: str) -> pa.Table:
        df = self.spark.sql(sql)
        if hasattr(df, "toArrow"):
            return df.toArrow()
        return pa.Table.from_pandas(df.toPandas(), preserve_index=False)

    def close(self) -> None:
        pass


def open_query(sources: Sources, engine: str = "local", spark_master: str = "local[*]") -> Any:
    if engine == "spark":
        return SparkQuery(sources, spark_master)
    return DuckDBQuery(sources)


# ---------------------------------------------------------------------------------------------- checks

_MISSING_COL = re.compile(r'(?:Referenced column|column) "?([A-Za-z_][A-Za-z0-9_]*)"? not found', re.I)


def check_clauses(ds: DatasetDir, sources: Sources, clauses: list[Clause]) -> None:
    """Bind every clause with DuckDB before anything runs: a missing column names the stage providing it."""
    q = DuckDBQuery(sources)
    try:
        for c in clauses:
            expr = c.where if c.where is not None else f"CAST(({c.by}) AS DOUBLE)"
            try:
                q.con.execute(f"SELECT {expr} FROM samples LIMIT 0")
            except Exception as e:  # duckdb raises Binder/Parser errors; the message names the column
                raise InputError(_explain(ds, sources, c, e)) from None
    finally:
        q.close()


def _explain(ds: DatasetDir, sources: Sources, clause: Clause, err: Exception) -> str:
    text = clause.where if clause.where is not None else clause.by
    what = f"clause '{clause.name}' ({text})"
    m = _MISSING_COL.search(str(err))
    if m:
        col = m.group(1)
        for stage, cols in STAGE_COLUMNS.items():
            if col in cols:
                return (f"{what}: column '{col}' is provided by stage '{stage}', which has not been run "
                        f"on {ds.root} (no signals/{stage}/); run `curate {stage} {ds.root}` first")
        return (f"{what}: unknown column '{col}'; the samples view of {ds.root} has: "
                f"{', '.join(sources.all_columns())}")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{what}: not a valid SQL expression over the samples view: {first}"
