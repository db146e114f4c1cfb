"""The demo's signal figures against the demo web's ground truth, clause by clause: what the `english` clause
of an export removed (not what the export dropped for any reason), and what dedup dropped, by evidence.

    python bench/demo_signals.py [demo-out]      # after `make demo`

DuckDB over the files the pipeline wrote: the pool's ledger (SAMPLE_ID), score and dedup signal tables, the
curated export's selection (`d`: the first clause that dropped each row) and summary (clause names), and
the web's ground_truth.parquet.

english clause: rows the clause saw (downloaded and scored) whose caption is clean or non-English in the
truth; removed = dropped by that clause; truth = caption_kind 'non_english'. fastText top-1 (`lang_fasttext <>
'en'`, DataComp's rule) is scored on the same rows.
duplicates: per row as the report scores them (a drop is right when the row is a copy whose original is in the
dataset), and per true pair, which does not depend on which member the keep policy kept (right: a drop whose
kept_key is its true partner; found: true pairs with one member dropped for the other). The largest group
counts the kept row and every row dropped for it.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path
from typing import Any


def pr(tp: int, fp: int, fn: int) -> str:
    p = tp / (tp + fp) if tp + fp else float("nan")
    r = tp / (tp + fn) if tp + fn else float("nan")
    return f"precision {p:.3f} recall {r:.3f} (tp {tp}, fp {fp}, fn {fn}, support {tp + fn})"


def main() -> None:
    import duckdb

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", nargs="?", default="demo-out", type=Path)
    ap.add_argument("--export", default="curated", help="the export folder under WORKDIR with the english clause")
    args = ap.parse_args()
    w = args.workdir
    sel = sorted(glob.glob(str(w / args.export / "_work" / "export" / "sel-*")))
    if len(sel) > 1:
        raise SystemExit(f"{w / args.export}: expected one export selection, found {len(sel)}")
    con = duckdb.connect()
    con.execute("SET threads=2")
    pool = w / "pool"
    for name, path in (("ledger", pool / "ledger"), ("score", pool / "signals" / "score"),
                       ("dedup", pool / "signals" / "dedup")):
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{path}/*.parquet')")
    con.execute(f"CREATE VIEW truth AS SELECT * FROM read_parquet('{w / 'web' / 'ground_truth.parquet'}')")
    con.execute("CREATE VIEW j AS SELECT l.key, t.* FROM ledger l JOIN truth t "
                "ON CAST(l.SAMPLE_ID AS VARCHAR) = CAST(t.SAMPLE_ID AS VARCHAR)")
    if sel:
        english_clause(con, Path(sel[0]))
    else:
        print(f"{w / args.export}: no export selection, so no english-clause figure")
    duplicates(con)


def english_clause(con: Any, sel: Path) -> None:
    clauses = [c["clause"] for c in json.loads((sel / "summary.json").read_text())["clauses"]]
    english = next(i for i, c in enumerate(clauses) if c.endswith("english"))
    con.execute(f"CREATE VIEW sel AS SELECT * FROM read_parquet('{sel / 'selection'}/*.parquet')")
    lang = con.execute(
        f"SELECT count(*) FILTER (rm AND ne), count(*) FILTER (rm AND NOT ne), count(*) FILTER (NOT rm AND ne), "
        f"count(*) FILTER (ft AND ne), count(*) FILTER (ft AND NOT ne), count(*) FILTER (NOT ft AND ne) FROM ("
        f"SELECT coalesce(s.d = {english}, false) AS rm, j.caption_kind = 'non_english' AS ne, "
        f"coalesce(sc.lang_fasttext, '') <> 'en' AS ft FROM j JOIN sel s USING (key) JOIN score sc USING (key) "
        f"WHERE (s.d IS NULL OR s.d >= {english}) AND sc.scored AND j.caption_kind IN ('clean', 'non_english'))"
    ).fetchone()
    print(f"{clauses[english]} clause alone: {pr(*lang[:3])}")
    print(f"fastText top-1 on the same rows: {pr(*lang[3:])}")


def duplicates(con: Any) -> None:

    # the report's per-row truth: a copy whose original is in the deduplicated set
    con.execute("CREATE VIEW dd AS SELECT j.*, d.is_duplicate, d.kept_key, d.dup_evidence FROM j JOIN dedup d "
                "USING (key)")
    con.execute("CREATE VIEW pairs AS SELECT c.key AS copy_key, o.key AS orig_key FROM dd c JOIN dd o "
                "ON CAST(c.dup_of AS VARCHAR) = CAST(o.SAMPLE_ID AS VARCHAR)")
    row = con.execute(
        "SELECT count(*) FILTER (is_duplicate AND is_copy), count(*) FILTER (is_duplicate AND NOT is_copy), "
        "count(*) FILTER (NOT is_duplicate AND is_copy) FROM (SELECT key, coalesce(is_duplicate, false) AS "
        "is_duplicate, key IN (SELECT copy_key FROM pairs) AS is_copy FROM dd)").fetchone()
    print(f"duplicates (per row, as the report scores them): {pr(*row)}")
    right, drops = con.execute(
        "SELECT count(*) FILTER (p.copy_key IS NOT NULL OR q.orig_key IS NOT NULL), count(*) FROM dd "
        "LEFT JOIN pairs p ON dd.key = p.copy_key AND dd.kept_key = p.orig_key "
        "LEFT JOIN pairs q ON dd.key = q.orig_key AND dd.kept_key = q.copy_key WHERE dd.is_duplicate").fetchone()
    found, n_pairs = con.execute(
        "SELECT count(*) FILTER (c.is_duplicate AND c.kept_key = p.orig_key OR o.is_duplicate AND "
        "o.kept_key = p.copy_key), count(*) FROM pairs p JOIN dd c ON c.key = p.copy_key "
        "JOIN dd o ON o.key = p.orig_key").fetchone()
    print(f"duplicates (per true pair, any keep policy): precision {right / max(drops, 1):.3f} "
          f"recall {found / max(n_pairs, 1):.3f} ({right} of {drops} drops name their true partner; "
          f"{found} of {n_pairs} true pairs found)")
    largest = con.execute("SELECT coalesce(max(n), 1) FROM (SELECT kept_key, count(*) + 1 AS n FROM dd "
                          "WHERE is_duplicate GROUP BY kept_key)").fetchone()[0]
    print(f"largest duplicate group: {largest} rows (largest true group: 2)")
    for ev, n in con.execute("SELECT dup_evidence, count(*) FROM dd WHERE is_duplicate GROUP BY 1 ORDER BY 1"
                             ).fetchall():
        ok = con.execute("SELECT count(*) FROM dd WHERE is_duplicate AND dup_evidence = ? AND key IN "
                         "(SELECT copy_key FROM pairs)", [ev]).fetchone()[0]
        print(f"  drops by {ev} evidence: {n} ({ok} of them true copies)")


if __name__ == "__main__":
    main()
