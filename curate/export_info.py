"""What an export directory says about its source: the kept keys, the dropped keys with their clause, and
the per-clause counts of its manifest. Read defensively: any part may be missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curate.errors import InputError
from curate.inspect import parquet_source
from curate.io import manifest
from curate.io.layout import DatasetDir

# the export ledger names the source sample in the first of these columns it has
SOURCE_KEY_COLUMNS = ("source_key", "src_key", "orig_key", "key")
REASON_COLUMNS = ("clause", "reason", "dropped_by", "rule", "predicate")


@dataclass
class ExportInfo:
    root: Path
    entry: dict[str, Any] = field(default_factory=dict)
    kept_files: list[Path] = field(default_factory=list)
    key_column: str | None = None
    dropped_files: list[Path] = field(default_factory=list)
    reason_column: str | None = None

    @property
    def counts(self) -> dict[str, Any]:
        c = self.entry.get("counts")
        return c if isinstance(c, dict) else {}

    def register(self, con: Any) -> set[str]:
        """Create views `kept(key)` and `dropped(key, reason)` on a DuckDB connection; returns those made."""
        made = set()
        if self.kept_files and self.key_column:
            con.execute(f"CREATE VIEW kept AS SELECT DISTINCT CAST({self.key_column} AS VARCHAR) AS key "
                        f"FROM {parquet_source(self.kept_files)}")
            made.add("kept")
        if self.dropped_files:
            reason = f"CAST({self.reason_column} AS VARCHAR)" if self.reason_column else "'dropped by export'"
            con.execute(f"CREATE VIEW dropped AS SELECT CAST(key AS VARCHAR) AS key, any_value({reason}) AS reason "
                        f"FROM {parquet_source(self.dropped_files)} GROUP BY 1")
            made.add("dropped")
        return made

    def clauses(self) -> list[dict[str, Any]]:
        """[{clause, removed, remaining?}] in policy order, from the manifest counts."""
        c = self.counts
        for name in ("clauses", "per_clause", "reasons", "dropped_by", "dropped"):
            value = c.get(name)
            if isinstance(value, list):
                out = []
                for item in value:
                    if not isinstance(item, dict):
                        continue
                    label = next((item[k] for k in ("clause", "name", "predicate", "where", "reason") if k in item), "?")
                    removed = next((item[k] for k in ("removed", "dropped", "count", "n") if k in item), None)
                    out.append({"clause": str(label), "removed": removed, "remaining": item.get("remaining")})
                if out:
                    return out
            if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
                return [{"clause": str(k), "removed": v, "remaining": None} for k, v in value.items()]
        return []

    def count(self, *names: str) -> int | None:
        for n in names:
            v = self.counts.get(n)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return int(v)
        return None


def _first_column(files: list[Path], candidates: tuple[str, ...]) -> str | None:
    import pyarrow.parquet as pq

    names = set()
    for p in files:
        names |= set(pq.read_schema(p).names)
    return next((c for c in candidates if c in names), None)


def read_export(export_dir: str | os.PathLike, flag: str = "--export-dir") -> ExportInfo:
    ds = DatasetDir.at(export_dir)
    if not ds.root.is_dir():
        raise InputError(f"{flag}: {ds.root} is not a directory")
    entry = manifest.load(ds).get("stages", {}).get("export", {}) if ds.manifest.exists() else {}
    info = ExportInfo(ds.root, entry if isinstance(entry, dict) else {})
    info.kept_files = ds.ledger_files() or sorted(p for p in (ds.root / "ledger").glob("*.parquet")
                                                  if not p.name.startswith("."))
    if info.kept_files:
        info.key_column = _first_column(info.kept_files, SOURCE_KEY_COLUMNS)
    dropped = [ds.root / "dropped.parquet"] + sorted((ds.root / "dropped").glob("*.parquet"))
    info.dropped_files = [p for p in dropped if p.is_file()]
    if info.dropped_files:
        if _first_column(info.dropped_files, ("key",)) is None:
            raise InputError(f"{flag}: {info.dropped_files[0]} has no 'key' column")
        info.reason_column = _first_column(info.dropped_files, REASON_COLUMNS)
    return info


def resolve_dirs(dataset_dir: str | os.PathLike,
                 export_dir: str | os.PathLike | None) -> tuple[Path, Path | None]:
    """(source dataset, export) for a report: DIR given as an export dir stands for its source plus itself."""
    if export_dir is not None:
        return Path(dataset_dir), Path(export_dir)
    ds = DatasetDir.at(dataset_dir)
    entry = manifest.load(ds).get("stages", {}).get("export") if ds.manifest.exists() else None
    if isinstance(entry, dict):
        source = (entry.get("config") or {}).get("source") or (entry.get("inputs") or {}).get("source")
        if source and DatasetDir.at(source).root != ds.root and Path(source).is_dir():
            return Path(source), ds.root
    return Path(dataset_dir), None
