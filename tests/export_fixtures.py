"""A small downloaded + scored + deduplicated dataset dir with known signals, for export and policy tests.

Tars and ledger come from dataset_factory.make_dataset (real writers); the score and dedup signal
tables follow the data contract and are written from `truth()`, the per-row values tests check against.

27 rows in shards of 9: failures 3 timeout, 9 http_4xx, 17 decode_error; row 20 downloaded, not scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
from dataset_factory import color_image, make_dataset

from curate.io.atomic import write_json
from curate.io.layout import DatasetDir, sample_key, shard_name, shard_of_key
from curate.io.manifest import record_stage
from curate.io.tables import write_table

N_ROWS = 27
SHARD_SIZE = 9
FAILURES = {3: "timeout", 9: "http_4xx", 17: "decode_error"}
NOT_SCORED = {20: "decode_error"}
LANG = {5: "de", 13: "fr", 21: "de", 22: "de", 23: "es", 11: "und", 24: "und"}  # 23, 11: clip_score 0.27
# fastText lid.176's own top-1 label where it differs from the language ID's (a short English caption it
# calls Finnish; an undetermined one it calls English)
LANG_FASTTEXT = {25: "fi", 11: "fi", 24: "en"}
CAPTIONS = {6: "ok", 14: "two words", 15: "a b c"}  # 1 word; 2 words; 3 words but 5 chars
SIZES = {7: (150, 300), 11: (900, 250), 19: (200, 200)}  # too small; aspect 3.6; boundary (kept)
DUP_GROUPS = {1: [0, 8, 16], 2: [2, 10]}  # group -> rows, first kept
CONTAMINATED = {12}


def key_of(row: int) -> str:
    return sample_key(shard_name(row // SHARD_SIZE), row % SHARD_SIZE)


def truth() -> list[dict[str, Any]]:
    """One dict per row with every value the samples view should show."""
    group_of = {r: g for g, rs in DUP_GROUPS.items() for r in rs}
    out = []
    for r in range(N_ROWS):
        status = FAILURES.get(r, "success")
        scored = status == "success" and r not in NOT_SCORED
        caption = CAPTIONS.get(r, f"a photo of thing number {r}")
        w, h = SIZES.get(r, (256, 240))
        g = group_of.get(r, -1)
        out.append({
            "row": r, "key": key_of(r), "status": status, "scored": scored, "caption": caption,
            "clip_score": round(0.22 + ((r * 7) % 12) * 0.01, 4) if scored else None,
            "lang": LANG.get(r, "en") if scored else None,
            "lang_fasttext": LANG_FASTTEXT.get(r, LANG.get(r, "en")) if scored else None,
            "caption_words": len(caption.split()), "caption_chars": len(caption),
            "orig_width": w if status == "success" else None, "orig_height": h if status == "success" else None,
            "aspect_ratio": max(w, h) / min(w, h),
            "in_dedup": scored,
            "is_duplicate": scored and g >= 0 and DUP_GROUPS[g][0] != r,
            "eval_contaminated": scored and r in CONTAMINATED,
        })
    return out


def make_export_source(root: Path, with_score: bool = True, with_dedup: bool = True) -> DatasetDir:
    rows = truth()
    samples = []
    for t in rows:
        r = t["row"]
        image = color_image(r, SIZES.get(r, (256, 240))) if t["status"] == "success" else None
        samples.append((image, t["caption"], t["status"]))
    ds = make_dataset(root, samples, shard_size=SHARD_SIZE)
    shards = sorted({shard_of_key(t["key"]) for t in rows})
    record_stage(ds, "download", config={"fixture": True}, fingerprint="d0wn10ad")
    for shard in shards:
        part = [t for t in rows if shard_of_key(t["key"]) == shard]
        if with_score:
            write_table(ds.signals("score", shard), _score_table(part))
            write_json(ds.marker("score", shard), {"shard": shard, "stats": {}})
        if with_dedup:
            write_table(ds.signals("dedup", shard), _dedup_table(part))
            write_json(ds.marker("dedup", shard), {"shard": shard, "stats": {}})
    if with_score:
        record_stage(ds, "score", config={"fixture": True}, fingerprint="5c0re000")
    if with_dedup:
        record_stage(ds, "dedup", config={"fixture": True}, fingerprint="dedup000")
    return ds


def _score_table(part: list[dict[str, Any]]) -> pa.Table:
    recs = []
    for t in part:
        ok = t["scored"]
        recs.append({
            "key": t["key"], "scored": ok,
            "skip_reason": None if ok else (t["status"] if t["status"] != "success" else NOT_SCORED[t["row"]]),
            "clip_score": t["clip_score"], "lang": t["lang"], "lang_prob": 0.9 if ok else None,
            "lang_fasttext": t["lang_fasttext"], "lang_fasttext_prob": 0.5 if ok else None,
            "caption_chars": t["caption_chars"], "caption_words": t["caption_words"], "letter_share": 0.8,
            "caption_boilerplate": False, "width": t["orig_width"], "height": t["orig_height"],
            "orig_width": t["orig_width"], "orig_height": t["orig_height"],
            "aspect_ratio": t["aspect_ratio"] if t["status"] == "success" else None,
            "bytes": 1000, "emb_row": -1,
        })
    schema = pa.schema([
        ("key", pa.string()), ("scored", pa.bool_()), ("skip_reason", pa.string()), ("clip_score", pa.float32()),
        ("lang", pa.string()), ("lang_prob", pa.float32()), ("lang_fasttext", pa.string()),
        ("lang_fasttext_prob", pa.float32()), ("caption_chars", pa.int32()),
        ("caption_words", pa.int32()), ("letter_share", pa.float32()), ("caption_boilerplate", pa.bool_()),
        ("width", pa.int32()), ("height", pa.int32()), ("orig_width", pa.int32()), ("orig_height", pa.int32()),
        ("aspect_ratio", pa.float32()), ("bytes", pa.int64()), ("emb_row", pa.int32()),
    ])
    return pa.Table.from_pylist(recs, schema=schema)


def _dedup_table(part: list[dict[str, Any]]) -> pa.Table:
    recs = [{"key": t["key"], "exact_dup": False, "dup_group": -1, "is_duplicate": t["is_duplicate"],
             "kept_key": t["key"], "cluster": 0, "nn_similarity": 0.5, "nn_key": t["key"],
             "eval_contaminated": t["eval_contaminated"], "eval_similarity": 0.1}
            for t in part if t["in_dedup"]]
    schema = pa.schema([
        ("key", pa.string()), ("exact_dup", pa.bool_()), ("dup_group", pa.int64()), ("is_duplicate", pa.bool_()),
        ("kept_key", pa.string()), ("cluster", pa.int32()), ("nn_similarity", pa.float32()), ("nn_key", pa.string()),
        ("eval_contaminated", pa.bool_()), ("eval_similarity", pa.float32()),
    ])
    return pa.Table.from_pylist(recs, schema=schema)
