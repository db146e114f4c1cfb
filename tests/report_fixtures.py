"""A small, fully known dataset dir (download + score + dedup), an export of it, ground truth and a probe dir.

Built with the real writers (ShardWriter, write_table, markers, record_stage) so inspect and report read
exactly what the stages write. Every figure the tests assert follows from the tables below.

24 input rows in two downloaded shards of 12 (a third input slice, 00000002, is planned but not downloaded):
  failures: 9 http_4xx, 10 timeout, 11 decode_error, 22 http_4xx, 23 blocked_scheme  -> 19 successes
  score: every success scored except 21 (per-sample decode_error) -> 18 scored
  clip_score = 0.05 + 0.02 * row; lang it for 3 and 14, de for 15, en otherwise
  dedup groups: {0 kept, 12, 13} and {4 kept, 5}; exact_dup 0 and 12; eval_contaminated 7
  export clauses: downloaded (-5 failures), clip_score >= 0.1 (-0,1,2 and unscored 21), lang = 'en' (-3,14,15),
  NOT is_duplicate AND NOT eval_contaminated (-5,7,12,13) -> kept 4,6,8,16,17,18,19,20
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from curate.io.atomic import write_json
from curate.io.layout import DatasetDir, sample_key, shard_name, shard_of_key
from curate.io.ledger import LEDGER_FIELDS
from curate.io.manifest import record_stage
from curate.io.shards import ShardWriter
from curate.io.tables import write_table

ROWS_PER_SHARD = 12
N_ROWS = 24
FAILURES = {9: "http_4xx", 10: "timeout", 11: "decode_error", 22: "http_4xx", 23: "blocked_scheme"}
NOT_SCORED = {21: "decode_error"}
LANG = {3: "it", 14: "it", 15: "de"}
DUP_GROUPS = {7: [0, 12, 13], 9: [4, 5]}  # dup_group -> rows, first one kept
EXACT_DUP = {0, 12}
CONTAMINATED = {7}
CLAUSES = [  # as curate export records them: the first is always "downloaded"; NULL clip_score fails a clause
    ("downloaded", sorted(FAILURES)),
    ("clip_score >= 0.1", [0, 1, 2, 21]),
    ("lang = 'en'", [3, 14, 15]),
    ("NOT is_duplicate AND NOT eval_contaminated", [5, 7, 12, 13]),
]
KEPT = [4, 6, 8, 16, 17, 18, 19, 20]
CAPTION_KIND = {1: "misaligned", 2: "misaligned", 17: "misaligned", 6: "boilerplate", 20: "boilerplate",
                3: "non_english", 14: "non_english", 15: "non_english"}
TRUTH_FAULTS = {**FAILURES, 21: "decode_error"}  # 21 is truncated bytes that download let through
TRUTH_DUPS = {12: (0, "exact"), 13: (0, "resized"), 5: (4, "cropped"), 16: (6, "reencoded")}


def key_of(row: int) -> str:
    return sample_key(shard_name(row // ROWS_PER_SHARD), row % ROWS_PER_SHARD)


def shard_of(row: int) -> str:
    return shard_name(row // ROWS_PER_SHARD)


def clip_score(row: int) -> float:
    return float(np.float32(0.05 + 0.02 * row))


def url_of(row: int) -> str:
    if row == 23:
        return "ftp://files.example.com/x.jpg"
    host = {9: "bad.example.org", 11: "bad.example.org", 22: "bad.example.org", 10: "slow.example.net"}
    return f"http://{host.get(row, 'img.example.com')}:8080/img/{row}.jpg?x=1"


def caption_of(row: int) -> str:
    return {3: "un gatto sul tetto", 14: "una casa rossa", 15: "ein Haus am See"}.get(row, f"a picture number {row}")


def _image_row(row: int) -> int:
    """Duplicates show their original's picture."""
    for rows in DUP_GROUPS.values():
        if row in rows:
            return rows[0]
    return row


def jpeg(row: int, size: int = 48) -> bytes:
    src = _image_row(row)
    color = ((src * 53) % 256, (src * 97) % 256, (src * 193) % 256)
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _ledger_row(row: int) -> dict:
    status = FAILURES.get(row, "success")
    ok = status == "success"
    rec = {f.name: None for f in LEDGER_FIELDS}
    rec.update(key=key_of(row), shard=shard_of(row), row=row, url=url_of(row), caption=caption_of(row),
               status=status, error_code=None if ok else status, attempts=1,
               http_status=200 if ok else (404 if status == "http_4xx" else None),
               width=48 if ok else None, height=48 if ok else None, orig_width=48 if ok else None,
               orig_height=48 if ok else None, SAMPLE_ID=f"s{row:03d}")
    return rec


def _ledger_table(rows: list[int]) -> pa.Table:
    schema = pa.schema(LEDGER_FIELDS + [pa.field("SAMPLE_ID", pa.string())])
    return pa.Table.from_pylist([_ledger_row(r) for r in rows], schema=schema)


def _write_shard(ds: DatasetDir, shard: str, rows: list[int]) -> None:
    with ShardWriter(ds.shard_tar(shard)) as w:
        for r in rows:
            if FAILURES.get(r) is None:
                meta = {k: v for k, v in _ledger_row(r).items() if v is not None}
                w.write(key_of(r), jpeg(r), "jpg", caption_of(r), meta)


def _score_table(rows: list[int]) -> pa.Table:
    recs = []
    for r in rows:
        ok = r not in FAILURES and r not in NOT_SCORED
        recs.append({
            "key": key_of(r), "scored": ok,
            "skip_reason": None if ok else FAILURES.get(r, NOT_SCORED.get(r)),
            "clip_score": clip_score(r) if ok else None, "lang": LANG.get(r, "en") if ok else None,
            "lang_prob": 0.9 if ok else None, "caption_boilerplate": ok and r in (6, 20),
            "width": 48, "height": 48, "emb_row": -1,
        })
    schema = pa.schema([("key", pa.string()), ("scored", pa.bool_()), ("skip_reason", pa.string()),
                        ("clip_score", pa.float32()), ("lang", pa.string()), ("lang_prob", pa.float32()),
                        ("caption_boilerplate", pa.bool_()), ("width", pa.int32()), ("height", pa.int32()),
                        ("emb_row", pa.int32())])
    return pa.Table.from_pylist(recs, schema=schema)


def _dedup_table(rows: list[int]) -> pa.Table:
    group_of = {r: g for g, rs in DUP_GROUPS.items() for r in rs}
    recs = []
    for r in rows:
        if r in FAILURES or r in NOT_SCORED:
            continue
        g = group_of.get(r, -1)
        kept = DUP_GROUPS[g][0] if g >= 0 else r
        recs.append({"key": key_of(r), "exact_dup": r in EXACT_DUP, "dup_group": g,
                     "is_duplicate": g >= 0 and kept != r, "kept_key": key_of(kept), "cluster": r % 3,
                     "nn_similarity": 0.99 if g >= 0 else 0.5, "nn_key": key_of(kept),
                     "eval_contaminated": r in CONTAMINATED, "eval_similarity": 0.97 if r in CONTAMINATED else 0.1})
    schema = pa.schema([("key", pa.string()), ("exact_dup", pa.bool_()), ("dup_group", pa.int64()),
                        ("is_duplicate", pa.bool_()), ("kept_key", pa.string()), ("cluster", pa.int32()),
                        ("nn_similarity", pa.float32()), ("nn_key", pa.string()),
                        ("eval_contaminated", pa.bool_()), ("eval_similarity", pa.float32())])
    return pa.Table.from_pylist(recs, schema=schema)


def _mark(ds: DatasetDir, stage: str, shard: str) -> None:
    write_json(ds.marker(stage, shard), {"shard": shard, "stats": {}})


def make_report_dataset(root: Path) -> Path:
    """The source dataset (download, score, dedup done on shards 00000000 and 00000001; 00000002 pending)."""
    ds = DatasetDir.at(root)
    for i in range(3):
        rows = list(range(i * ROWS_PER_SHARD, (i + 1) * ROWS_PER_SHARD))
        write_table(ds.root / "_inputs" / f"{shard_name(i)}.parquet",
                    pa.table({"url": [url_of(r) for r in rows], "caption": [caption_of(r) for r in rows]}))
    for i in range(2):
        shard = shard_name(i)
        rows = list(range(i * ROWS_PER_SHARD, (i + 1) * ROWS_PER_SHARD))
        _write_shard(ds, shard, rows)
        write_table(ds.ledger(shard), _ledger_table(rows))
        _mark(ds, "download", shard)
        write_table(ds.signals("score", shard), _score_table(rows))
        _mark(ds, "score", shard)
        write_table(ds.signals("dedup", shard), _dedup_table(rows))
        _mark(ds, "dedup", shard)
    record_stage(ds, "download", config={"image_size": 48, "url_col": "URL"}, fingerprint="d0wn10ad",
                 counts={"success": 19}, extra={"shards": {"total": 3, "failed": []}})
    record_stage(ds, "score", config={"model": "curate-tiny"}, fingerprint="5c0re000")
    record_stage(ds, "dedup", config={"threshold": 0.95}, fingerprint="dedup000")
    return ds.root


def make_export(source: Path, out: Path) -> Path:
    """An export of the source: kept rows' ledger and shard, per-clause counts and dropped.parquet."""
    ds = DatasetDir.at(out)
    _write_shard(ds, "00000000", KEPT)
    table = _ledger_table(KEPT).append_column("source_shard", pa.array([shard_of(r) for r in KEPT]))
    write_table(ds.ledger("00000000"), table.append_column("source_key", pa.array([key_of(r) for r in KEPT])))
    _mark(ds, "export", "00000000")
    remaining = N_ROWS
    clauses = []
    for clause, rows in CLAUSES:
        remaining -= len(rows)
        clauses.append({"clause": clause, "removed": len(rows), "remaining": remaining})
    record_stage(ds, "export", config={"source": str(source), "policy": ["demo"]}, fingerprint="exp0rt00",
                 counts={"input": N_ROWS, "clauses": clauses, "kept": len(KEPT)},
                 extra={"shards": {"total": 1, "failed": []}})
    dropped = sorted((key_of(r), c) for c, rows in CLAUSES for r in rows)
    write_table(ds.root / "dropped.parquet",
                pa.table({"key": [k for k, _ in dropped], "source_shard": [shard_of_key(k) for k, _ in dropped],
                          "clause": [c for _, c in dropped]}))
    return ds.root


def make_ground_truth(path: Path) -> Path:
    recs = []
    for r in range(N_ROWS):
        dup = TRUTH_DUPS.get(r)
        recs.append({"SAMPLE_ID": f"s{r:03d}", "URL": url_of(r), "TEXT": caption_of(r), "image_id": _image_row(r),
                     "category": "animals" if r % 2 else "buildings", "fault": TRUTH_FAULTS.get(r),
                     "expected_error_code": TRUTH_FAULTS.get(r), "dup_of": f"s{dup[0]:03d}" if dup else None,
                     "dup_kind": dup[1] if dup else None, "caption_kind": CAPTION_KIND.get(r, "clean"),
                     "clean_caption": f"a picture number {r}"})
    write_table(path, pa.Table.from_pylist(recs))
    return path


def make_probe_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    results = {"runs": [
        {"subset": "raw", "seed": 0, "samples_seen": 512, "zeroshot_top1": 0.21, "zeroshot_top5": 0.55},
        {"subset": "curated", "seed": 0, "samples_seen": 512, "zeroshot_top1": 0.34, "zeroshot_top5": 0.71},
    ]}
    (path / "results.json").write_text(json.dumps(results))
    (path / "results.md").write_text("| subset | top1 |\n|---|---|\n| raw | 0.21 |\n| curated | 0.34 |\n")
    buf = io.BytesIO()
    Image.new("RGB", (60, 40), (200, 30, 30)).save(buf, "PNG")
    (path / "zeroshot.png").write_bytes(buf.getvalue())
    return path
