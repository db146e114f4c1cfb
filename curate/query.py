"""The joined `samples` view (ledger + every signal table) and the selection query run over it.

The view and every predicate are plain SQL text run unchanged by DuckDB (local) or Spark SQL
(`--engine spark`), so a policy means the same thing on a laptop and on a cluster. Both engines
write their results to parquet on disk; only per-clause counts and per-shard numbers (O(clauses +
shards)) ever come back to the driver.

Signal tables: every folder signals/NAME/ whose shards have a done marker (_done/NAME/) joins the
view on `key`. The default scorer's table (`score`) and `dedup` keep their column names; any other
table's columns are prefixed with its name (signals/dfn/ -> dfn_clip_score), so a second scorer or a
policy tagger never shadows the default one.
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
from curate.machine import sql_memory_limit

SIGNAL_STAGES = ("score", "dedup")  # the unprefixed tables, joined first in this order
# the columns each signal stage provides (the data contract), to name the stage a predicate needs
STAGE_COLUMNS: dict[str, tuple[str, ...]] = {
    "score": ("scored", "skip_reason", "clip_score", "lang", "lang_prob", "lang_fasttext",
              "lang_fasttext_prob", "caption_chars", "caption_words",
              "letter_share", "caption_boilerplate", "aspect_ratio", "emb_row"),
    "dedup": ("exact_dup", "dup_group", "is_duplicate", "kept_key", "cluster", "nn_similarity", "nn_key",
              "eval_contaminated", "eval_similarity", "dup_evidence"),
}
_LEDGER_NAMES = {f.name for f in LEDGER_FIELDS}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Clause:
    """One selection step: a SQL predicate (`where`) or the top `top_fraction` of the rows left, by `by`."""

    name: str
    where: str | None = None
    top_fraction: float | None = None
    by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def signal_tables(ds: DatasetDir) -> list[str]:
    """Names of the signal tables under signals/ that have at least one done shard: score, dedup, then the rest."""
    folder = ds.root / "signals"
    names = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    found = [n for n in names if not n.startswith(".") and ds.signal_files(n)]
    return [n for n in SIGNAL_STAGES if n in found] + [n for n in found if n not in SIGNAL_STAGES]


def column_prefix(table: str) -> str:
    """'' for the default tables, else the table name made an identifier, then '_'."""
    return "" if table in SIGNAL_STAGES else re.sub(r"[^A-Za-z0-9_]", "_", table) + "_"


def _alias(table: str) -> str:
    return table if table in SIGNAL_STAGES else "sig_" + re.sub(r"[^A-Za-z0-9_]", "_", table)


@dataclass(frozen=True)
class Sources:
    """The parquet files of one dataset dir that make up `samples`, and their column names."""

    files: dict[str, list[Path]]  # "ledger" | signal table name -> files
    columns: dict[str, list[str]]

    @classmethod
    def of(cls, ds: DatasetDir, shards: list[str] | None = None) -> Sources:
        ledger = [p for p in ds.ledger_files() if shards is None or p.stem in shards]
        if not ledger:
            raise InputError(f"{ds.root}: no completed ledger shards (ledger/ + _done/download/); "
                             f"run `curate download` first")
        files = {"ledger": ledger}
        for table in signal_tables(ds):
            found = [p for p in ds.signal_files(table) if shards is None or p.stem in shards]
            if found:
                files[table] = found
        columns = {name: _column_names(paths) for name, paths in files.items()}
        return cls(files, columns)

    @property
    def tables(self) -> list[str]:
        return [n for n in self.files if n != "ledger"]

    def output_columns(self, table: str) -> list[tuple[str, str]]:
        """(column in the table, column in the view) for one signal table, `key` left out."""
        pre = column_prefix(table)
        return [(c, pre + c) for c in self.columns.get(table, []) if c != "key"]

    def select_list(self, quote: str = '"') -> str:
        """The SELECT list of `samples`: the ledger's own fields, then each signal table's columns.

        A signal column shadows a ledger extra column of the same name (an export's ledger carries
        copies of the source signals), but never a ledger field (the ledger is the authority on status).
        """
        signal_cols = {out for t in self.tables for _, out in self.output_columns(t)}
        seen: set[str] = set()
        parts = []
        for c in self.columns["ledger"]:
            if c in _LEDGER_NAMES or c not in signal_cols:
                parts.append(f"l.{_q(c, quote)}")
                seen.add(c)
        for t in self.tables:
            for c, out in self.output_columns(t):
                if out not in seen:
                    alias = "" if c == out else f" AS {_q(out, quote)}"
                    parts.append(f"{_alias(t)}.{_q(c, quote)}{alias}")
                    seen.add(out)
        return ", ".join(parts)

    def view_sql(self, quote: str = '"') -> str:
        """The view definition; `quote` is the identifier quote of the engine (only odd names need it)."""
        joins = "".join(f" LEFT JOIN {_alias(t)} ON {_alias(t)}.key = l.key" for t in self.tables)
        # one row per input row: a row that a download retry superseded is history (its retry is the row)
        where = (" WHERE (l.superseded_by IS NULL OR l.superseded_by = '')"
                 if "superseded_by" in self.columns["ledger"] else "")
        return f"SELECT {self.select_list(quote)} FROM ledger l{joins}{where}"

    def all_columns(self) -> list[str]:
        out: list[str] = list(self.columns["ledger"])
        for t in self.tables:
            out += [o for _, o in self.output_columns(t) if o not in out]
        return out


def _q(name: str, quote: str) -> str:
    # DuckDB quotes identifiers with ", Spark SQL with `; plain names need neither
    return name if _IDENT.fullmatch(name) else f"{quote}{name}{quote}"


def _column_names(paths: list[Path]) -> list[str]:
    names: list[str] = []
    for p in paths:
        for n in pq.read_schema(p).names:
            if n not in names:
                names.append(n)
    return names


def selection_sql(clauses: list[Clause]) -> str:
    """One row per sample: key, source shard, and `d`, the index of the first clause that drops it (NULL: kept).

    Clauses apply in order. A `where` clause drops the live rows where it is not TRUE. A top clause
    ranks the live rows with a non-NULL, non-NaN value by (value desc, key asc) with a window and keeps
    the first floor(fraction * n + 0.5); the others are dropped by it. Plain SQL that DuckDB and Spark
    SQL both run, so the engines select the same rows.
    """
    cols = ["key", "shard"]
    for i, c in enumerate(clauses):
        if c.where is not None:
            cols.append(f"COALESCE(({c.where}), FALSE) AS c{i}")
        else:
            cols.append(f"CAST(({c.by}) AS DOUBLE) AS c{i}")
    keep = ", ".join(cols[:2] + [f"c{i}" for i in range(len(clauses))])
    ctes = [f"s0 AS (SELECT {', '.join(cols)}, CAST(NULL AS INT) AS d FROM samples)"]
    for i, c in enumerate(clauses):
        prev = f"s{len(ctes) - 1}"
        if c.where is not None:
            d = f"CASE WHEN d IS NULL AND NOT c{i} THEN {i} ELSE d END"
            ctes.append(f"s{len(ctes)} AS (SELECT {keep}, {d} AS d FROM {prev})")
            continue
        ok = f"CASE WHEN d IS NULL AND c{i} IS NOT NULL AND NOT isnan(c{i}) THEN 1 ELSE 0 END"
        ctes.append(f"s{len(ctes)} AS (SELECT {keep}, d, {ok} AS ok FROM {prev})")
        k = f"FLOOR(CAST({float(c.top_fraction)!r} AS DOUBLE) * SUM(ok) OVER () + 0.5)"
        rank = f"ROW_NUMBER() OVER (PARTITION BY ok ORDER BY c{i} DESC, key)"
        d = f"CASE WHEN d IS NOT NULL THEN d WHEN ok = 0 THEN {i} WHEN {rank} > {k} THEN {i} ELSE NULL END"
        ctes.append(f"s{len(ctes)} AS (SELECT {keep}, {d} AS d FROM s{len(ctes) - 1})")
    return f"WITH {', '.join(ctes)} SELECT key, shard, d FROM s{len(ctes) - 1}"


# ---------------------------------------------------------------------------------------------- engines

def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def parquet_files(path: Path) -> list[Path]:
    """A parquet file, or the data files of a folder one engine or the other wrote (hidden files skipped)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.parquet") if not p.name.startswith((".", "_")))


class DuckDBQuery:
    """Local SQL: DuckDB reads the parquet files in place; `spill` bounds its memory and gives it a temp folder."""

    def __init__(self, sources: Sources, spill: Path | None = None, memory_limit: str | None = None):
        import duckdb

        # $CURATE_SQL_MEMORY, else half the machine's memory per core, at most 600 MB
        memory_limit = memory_limit or sql_memory_limit(cap=600 << 20)

        self.con = duckdb.connect()
        if spill is not None:
            spill.mkdir(parents=True, exist_ok=True)
            self.con.execute(f"SET temp_directory = {_sql_str(str(spill))}")
            self.con.execute(f"SET memory_limit = {_sql_str(memory_limit)}")
            # order within a result only where the SQL asks for it: lets DuckDB stream and spill
            self.con.execute("SET preserve_insertion_order = false")
        for name, paths in sources.files.items():
            self._view("ledger" if name == "ledger" else _alias(name), paths)
        self.con.execute(f"CREATE VIEW samples AS {sources.view_sql()}")

    def _view(self, name: str, paths: list[Path]) -> None:
        files = ", ".join(_sql_str(str(p)) for p in paths)
        self.con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet([{files}], union_by_name=true)")

    def arrow(self, sql: str) -> pa.Table:
        """A small result (counts, per-shard numbers): collected, so never use it for per-row results."""
        rel = self.con.sql(sql)
        return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()

    def register(self, name: str, table: pa.Table) -> None:
        self.con.register(f"{name}_arrow", table)
        self.con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM {name}_arrow")

    def view(self, name: str, path: Path) -> None:
        self._view(name, parquet_files(path))

    def define(self, name: str, sql: str) -> None:
        self.con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")

    def write(self, sql: str, path: Path, partition_by: str | None = None, order_by: str | None = None) -> None:
        """Write a query's rows to parquet at `path` (a folder; hive folders COL=VALUE with `partition_by`)."""
        if order_by:
            sql = f"SELECT * FROM ({sql}) ORDER BY {order_by}"
        path.mkdir(parents=True, exist_ok=True)
        if partition_by:
            self.con.execute(f"COPY ({sql}) TO {_sql_str(str(path))} "
                             f"(FORMAT parquet, COMPRESSION zstd, PARTITION_BY ({partition_by}))")
        else:
            target = path / "part-0.parquet"
            self.con.execute(f"COPY ({sql}) TO {_sql_str(str(target))} (FORMAT parquet, COMPRESSION zstd)")

    def close(self) -> None:
        self.con.close()


class SparkQuery:
    """The same SQL on Spark: rows are written by the executors, never collected to the driver."""

    def __init__(self, sources: Sources, spark: Any):
        self.spark = spark  # the run's SparkSession (the runner lends it: curate.stages.base.RunContext)
        for name, paths in sources.files.items():
            df = self.spark.read.option("mergeSchema", "true").parquet(*[str(p) for p in paths])
            df.createOrReplaceTempView("ledger" if name == "ledger" else _alias(name))
        self.spark.sql(f"CREATE OR REPLACE TEMP VIEW samples AS {sources.view_sql('`')}")

    def arrow(self, sql: str) -> pa.Table:
        """A small result (counts, per-shard numbers): collected, so never use it for per-row results."""
        df = self.spark.sql(sql)
        if hasattr(df, "toArrow"):
            return df.toArrow()
        return pa.Table.from_pandas(df.toPandas(), preserve_index=False)

    def register(self, name: str, table: pa.Table) -> None:
        from pyspark.sql.types import LongType, StringType, StructField, StructType

        kinds = {pa.string(): StringType(), pa.int64(): LongType()}
        schema = StructType([StructField(f.name, kinds[f.type], True) for f in table.schema])
        rows = [tuple(r.values()) for r in table.to_pylist()]
        self.spark.createDataFrame(rows, schema).createOrReplaceTempView(name)

    def view(self, name: str, path: Path) -> None:
        self.spark.read.parquet(str(path)).createOrReplaceTempView(name)

    def define(self, name: str, sql: str) -> None:
        self.spark.sql(f"CREATE OR REPLACE TEMP VIEW {name} AS {sql}")

    def write(self, sql: str, path: Path, partition_by: str | None = None, order_by: str | None = None) -> None:
        df = self.spark.sql(sql)
        if order_by:  # one sorted file: the consumers (report, dropped.parquet) expect one
            df = df.repartition(1).sortWithinPartitions(*[c.strip() for c in order_by.split(",")])
        writer = df.write.mode("overwrite").option("compression", "zstd")
        if partition_by:
            writer = writer.partitionBy(partition_by)
        writer.parquet(str(path))

    def close(self) -> None:
        pass


def open_query(sources: Sources, spark: Any = None, spill: Path | None = None) -> Any:
    """The samples view on Spark SQL when given a SparkSession, else on DuckDB (spilling to `spill`)."""
    if spark is not None:
        return SparkQuery(sources, spark)
    return DuckDBQuery(sources, spill)


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
