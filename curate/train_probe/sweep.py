"""--sweep COLUMN=F1,F2,...: subsets of a scored dataset by kept fraction, top-by-column and a random control.

Candidates are the scored rows (download successes that score could read). "top" keeps the highest
values of the column (ties broken by key, so the choice is stable); "random" draws the same number of
keys with a fixed selection seed, so the seeds of a run vary the training and not the subset.
"""

from __future__ import annotations

from dataclasses import dataclass

from curate.errors import InputError
from curate.io.layout import DatasetDir

SELECTION_SEED = 0


@dataclass(frozen=True)
class SweepSpec:
    column: str
    fractions: tuple[float, ...]


def parse_sweep(text: str) -> SweepSpec:
    column, sep, values = text.partition("=")
    if not sep or not column.strip() or not values.strip():
        raise InputError(f"--sweep: expected COLUMN=F1,F2,... (e.g. clip_score=0.1,0.3,1.0), got '{text}'")
    try:
        fractions = tuple(sorted({float(v) for v in values.split(",") if v.strip()}))
    except ValueError:
        raise InputError(f"--sweep: fractions must be numbers in (0, 1], got '{values}'") from None
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad or not fractions:
        raise InputError(f"--sweep: fractions must be in (0, 1], got '{values}'")
    return SweepSpec(column.strip(), fractions)


def subset_name(kind: str, fraction: float) -> str:
    return f"{kind}-{fraction * 100:g}%"


def _ledger_files_with(ds: DatasetDir, column: str) -> list:
    """An export's ledger files when they carry `column` (export joins the score signals into its ledger)."""
    import pyarrow.parquet as pq

    files = ds.ledger_files()
    return files if files and all(column in pq.read_schema(f).names for f in files) else []


def read_column(ds: DatasetDir, column: str) -> tuple[list[str], list[float]]:
    """(keys, values) of the scored rows of the score signal tables, or of an export's ledger (which holds
    the source's score columns), so a study can sweep what an export's clauses left; InputError naming
    file/column."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = ds.signal_files("score") or _ledger_files_with(ds, column)
    if not files:
        raise InputError(f"--sweep-source: {ds.root} has no score signals (signals/score/*.parquet with "
                         f"_done/score markers) and no ledger column '{column}'; run `curate score` on it first")
    keys: list[str] = []
    values: list[float] = []
    for f in files:
        names = pq.read_schema(f).names
        if column not in names:
            raise InputError(f"--sweep: {f} has no column '{column}' (columns: {', '.join(names)})")
        t = pq.read_table(f, columns=["key", *(["scored"] if "scored" in names else []), column])
        ok = pc.is_valid(t.column(column))
        if "scored" in names:
            ok = pc.and_(pc.fill_null(t.column("scored"), False), ok)
        t = t.filter(ok)
        keys += t.column("key").to_pylist()
        try:
            values += [float(v) for v in t.column(column).to_pylist()]
        except (TypeError, ValueError):
            raise InputError(f"--sweep: column '{column}' of {f} is not numeric") from None
    if not keys:
        raise InputError(f"--sweep-source: {ds.root} has no scored rows with a '{column}' value")
    return keys, values


def sweep_subsets(keys: list[str], values: list[float], spec: SweepSpec,
                  available: set[str] | None = None) -> list[dict]:
    """[{name, kind ("top"|"random"|"all"), fraction, keys, threshold}] per fraction; at 100% one "all".

    `threshold` is the lowest column value a "top" subset keeps.

    `available` restricts the candidates to keys that are actually in the shards (decodable).
    """
    import random

    pairs = sorted(((k, v) for k, v in zip(keys, values, strict=True) if available is None or k in available),
                   key=lambda kv: (-kv[1], kv[0]))
    ranked = [k for k, _ in pairs]
    everything = sorted(ranked)
    out = []
    for f in spec.fractions:
        size = max(1, round(f * len(ranked)))
        if size >= len(ranked):
            out.append({"name": "all-100%", "kind": "all", "fraction": 1.0, "keys": everything,
                        "threshold": pairs[-1][1]})
            continue
        rng = random.Random(f"{SELECTION_SEED}:{spec.column}:{f}")
        out.append({"name": subset_name("top", f), "kind": "top", "fraction": f, "keys": sorted(ranked[:size]),
                    "threshold": pairs[size - 1][1]})
        out.append({"name": subset_name("random", f), "kind": "random", "fraction": f,
                    "keys": sorted(rng.sample(everything, size))})
    return out
