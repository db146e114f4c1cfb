"""Precision and recall of each curation step against the demo web's ground truth (ground_truth.parquet).

The truth joins the ledger on SAMPLE_ID (a kept column). Each step is a binary decision per sample,
scored over the samples that step could see:
  faults       all rows            predicted: ledger status != success     truth: expected_error_code set
  duplicates   deduplicated rows   predicted: is_duplicate                 truth: dup_of set and its original here
  duplicate_groups  same rows      predicted: in a dup_group               truth: an original or copy of a group here
  <caption kind>    scored, not flagged by dedup, caption clean or of that kind
                                   predicted: not exported                 truth: caption_kind is that kind
  noisy_captions    scored, not flagged by dedup   predicted: not exported truth: caption_kind != clean
Comparing each caption kind against clean captions only keeps a drop for another kind from counting
as a false positive of this one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from curate.errors import InputError
from curate.export_info import read_export, resolve_dirs
from curate.inspect import Tables, open_dataset, sql_str
from curate.report.report import _pct, _table

CAPTION_KINDS = ("misaligned", "boilerplate", "non_english")
TRUTH_COLUMNS = ("SAMPLE_ID", "expected_error_code", "dup_of", "caption_kind")


def _metrics(tp: int, fp: int, fn: int, tn: int) -> dict[str, Any]:
    return {
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "precision": round(tp / (tp + fp), 4) if tp + fp else None,
        "recall": round(tp / (tp + fn), 4) if tp + fn else None,
        "support": tp + fn, "population": tp + fp + fn + tn,
    }


def _confusion(t: Tables, source: str, predicted: str, truth: str) -> dict[str, Any]:
    tp, fp, fn, tn = t.rows(
        f"SELECT count(*) FILTER (p AND t), count(*) FILTER (p AND NOT t), count(*) FILTER (NOT p AND t), "
        f"count(*) FILTER (NOT p AND NOT t) FROM (SELECT coalesce({predicted}, false) AS p, "
        f"coalesce({truth}, false) AS t FROM {source})")[0]
    return _metrics(tp, fp, fn, tn)


def _read_truth(t: Tables, path: Path) -> None:
    import pyarrow.parquet as pq

    try:
        names = set(pq.read_schema(path).names)
    except (OSError, ValueError) as e:
        raise InputError(f"--ground-truth: cannot read {path} as parquet ({e})") from e
    missing = [c for c in TRUTH_COLUMNS if c not in names]
    if missing:
        raise InputError(f"--ground-truth: {path} lacks column(s) {', '.join(missing)}")
    t.con.execute(f"CREATE VIEW truth AS SELECT * FROM read_parquet({sql_str(path)})")


def curation_accuracy(dataset_dir: str | os.PathLike, ground_truth_path: str | os.PathLike,
                      export_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Per-step precision/recall against the demo web's ground truth (see the module doc for definitions)."""
    dataset_dir, export_dir = resolve_dirs(dataset_dir, export_dir)
    ds = open_dataset(dataset_dir)
    path = Path(ground_truth_path)
    if not path.is_file():
        raise InputError(f"--ground-truth: {path} does not exist")
    t = Tables(ds)
    try:
        _read_truth(t, path)
        if not t.has("ledger", "SAMPLE_ID"):
            raise InputError(f"{ds.root}/ledger: no SAMPLE_ID column to join the ground truth on "
                             "(download with --keep-col SAMPLE_ID)")
        t.con.execute("CREATE VIEW j AS SELECT l.key, l.status, l.error_code, t.* FROM truth t "
                      "JOIN ledger l ON CAST(l.SAMPLE_ID AS VARCHAR) = CAST(t.SAMPLE_ID AS VARCHAR)")
        truth_rows = t.scalar("SELECT count(*) FROM truth")
        matched = t.scalar("SELECT count(*) FROM j")
        out: dict[str, Any] = {"dataset": str(ds.root), "ground_truth": str(path), "truth_rows": truth_rows,
                               "matched": matched, "steps": {}}
        steps = out["steps"]
        faults = _confusion(t, "j", "status <> 'success'", "expected_error_code IS NOT NULL")
        faults["code_match"] = t.scalar("SELECT count(*) FILTER (error_code = expected_error_code) FROM j "
                                        "WHERE status <> 'success' AND expected_error_code IS NOT NULL")
        steps["faults"] = faults
        if t.has("dedup", "is_duplicate"):
            _duplicates(t, steps)
        if export_dir is not None and t.has("score"):
            _captions(t, steps, export_dir)
        return out
    finally:
        t.close()


def _duplicates(t: Tables, steps: dict[str, Any]) -> None:
    # a copy only counts as a duplicate when its original also made it into the deduplicated set
    t.con.execute("CREATE VIEW dd AS SELECT j.*, d.is_duplicate, d.dup_group FROM j JOIN dedup d USING (key)")
    t.con.execute("CREATE VIEW dd_truth AS SELECT dd.*, "
                  "(dup_of IS NOT NULL AND CAST(dup_of AS VARCHAR) IN (SELECT CAST(SAMPLE_ID AS VARCHAR) FROM dd)) "
                  "AS is_copy FROM dd")
    t.con.execute("CREATE VIEW dd_group AS SELECT *, is_copy OR CAST(SAMPLE_ID AS VARCHAR) IN "
                  "(SELECT CAST(dup_of AS VARCHAR) FROM dd_truth WHERE is_copy) AS in_truth_group FROM dd_truth")
    steps["duplicates"] = _confusion(t, "dd_truth", "is_duplicate", "is_copy")
    groups = _confusion(t, "dd_group", "dup_group >= 0", "in_truth_group")
    if "dup_kind" in {r[0] for r in t.rows("DESCRIBE truth")}:
        groups["recall_by_kind"] = {
            str(kind): round(hit / n, 4) for kind, hit, n in t.rows(
                "SELECT dup_kind, count(*) FILTER (dup_group >= 0), count(*) FROM dd_group "
                "WHERE is_copy AND dup_kind IS NOT NULL GROUP BY 1 ORDER BY 1")}
    steps["duplicate_groups"] = groups


def _captions(t: Tables, steps: dict[str, Any], export_dir: str | os.PathLike) -> None:
    info = read_export(export_dir)
    if "kept" not in info.register(t.con):
        return
    scored = "s.scored" if t.has("score", "scored") else "s.clip_score IS NOT NULL"
    flagged = []
    if t.has("dedup", "is_duplicate"):
        flagged.append("coalesce(d.is_duplicate, false)")
    if t.has("dedup", "eval_contaminated"):
        flagged.append("coalesce(d.eval_contaminated, false)")
    dedup_join = "LEFT JOIN dedup d USING (key)" if t.has("dedup") else ""
    not_flagged = f"AND NOT ({' OR '.join(flagged)})" if flagged else ""
    t.con.execute(f"CREATE VIEW cap AS SELECT j.*, j.key NOT IN (SELECT key FROM kept) AS dropped FROM j "
                  f"JOIN score s USING (key) {dedup_join} WHERE {scored} {not_flagged}")
    for kind in CAPTION_KINDS:
        steps[kind] = _confusion(t, f"(SELECT * FROM cap WHERE caption_kind IN ('clean', {sql_str(kind)}))",
                                 "dropped", f"caption_kind = {sql_str(kind)}")
    steps["noisy_captions"] = _confusion(t, "cap", "dropped", "caption_kind <> 'clean'")


def format_accuracy(acc: dict[str, Any]) -> str:
    """A few lines for a terminal: one per step with precision and recall."""
    def pct(v: float | None) -> str:
        return "  n/a" if v is None else f"{v:5.1%}"

    lines = [f"curation accuracy vs ground truth ({acc['matched']} of {acc['truth_rows']} rows matched):",
             f"  {'step':<18} {'precision':>9} {'recall':>7} {'support':>8}"]
    for name, m in acc["steps"].items():
        lines.append(f"  {name:<18} {pct(m['precision']):>9} {pct(m['recall']):>7} {m['support']:>8}")
    return "\n".join(lines)


def accuracy_section(truth: Path, dataset: Path, export_dir: str | os.PathLike | None) -> str:
    """The report's "Curation accuracy vs ground truth" section (HTML) for the demo web's ground truth."""
    if not Path(truth).is_file():
        raise InputError(f"--ground-truth: {truth} does not exist")
    acc = curation_accuracy(dataset, truth, export_dir)
    rows = [[name, _pct(m["precision"], 1) if m["precision"] is not None else "–",
             _pct(m["recall"], 1) if m["recall"] is not None else "–", m["tp"], m["fp"], m["fn"], m["support"],
             m["population"]] for name, m in acc["steps"].items()]
    out = [f"<p>{acc['matched']:,} of {acc['truth_rows']:,} ground-truth rows matched the ledger on SAMPLE_ID.</p>",
           _table(["step", "precision", "recall", "TP", "FP", "FN", "support", "population"], rows,
                  {1, 2, 3, 4, 5, 6, 7})]
    by_kind = acc["steps"].get("duplicate_groups", {}).get("recall_by_kind")
    if by_kind:
        out.append("<h3>duplicate recall by kind of copy</h3>"
                   + _table(list(by_kind), [[_pct(v, 1) for v in by_kind.values()]], set(range(len(by_kind)))))
    if export_dir is None:
        out.append('<p class="note">No --export-dir given: caption steps need the export to know what was dropped.</p>')
    out.append('<p class="note">faults: ledger status ≠ success vs expected_error_code; duplicates: is_duplicate '
               'vs dup_of (original downloaded too); duplicate_groups: in any dup group vs original-or-copy; '
               'caption kinds: not exported vs caption_kind, over scored samples not flagged by dedup, each kind '
               'against clean captions only.</p>')
    return "\n".join(out)
