"""A tiny dataset dir made by the real stages, for the tests of what reads their outputs (export, policies,
inspect, report): `curate download` from a loopback server, `curate score` with a tiny open_clip config and
`curate dedup` against a scored evaluation set.

Tests read the expected values from the tables the stages wrote (`rows()`), so a change in what download,
score or dedup write reaches them. What the input plants, and what the stages make of it:

27 rows in shards of 9 (00000000 .. 00000002):
  row 3: 404                          -> http_4xx
  row 9: an ftp:// URL                -> blocked_scheme
  row 17: bytes that are no image     -> decode_error
  row 20: a JPEG cut short            -> decode_error (download decodes every image it keeps)
  rows 8 and 16 serve row 0's bytes, row 10 row 2's -> exact duplicates for dedup
  row 12's image is in the evaluation set         -> eval_contaminated
  captions: English except rows 5, 13, 21, 22 (German) and 23 (Spanish); 6, 14, 15 short; 11 and 24 no words
  sizes: 256x240 except 7 (150x300), 11 (900x250) and 19 (200x200), for DataComp's size rules
dedup runs with --threshold 0.9999: the random tiny model puts every pair of these images above 0.97
cosine, so only byte-equal images (cosine 1) group. Its clip_scores are deterministic but meaningless:
tests derive thresholds from them, and plant values (`plant`) where a policy's fixed cut needs them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from dataset_factory import color_image, jpeg_bytes
from loopback import LoopServer

from curate.cli import main
from curate.io.layout import DatasetDir
from curate.io.tables import read_tables, write_table

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

N_ROWS = 27
SHARD_SIZE = 9
HTTP_404 = {3}
FTP = {9}
NOT_AN_IMAGE = {17}
TRUNCATED = {20}
SAME_BYTES = {8: 0, 16: 0, 10: 2}  # row -> the row whose bytes it serves
EVAL_ROWS = {12}
CAPTIONS = {
    5: "Ein kleiner Hund spielt im Garten mit einem roten Ball",
    13: "Das alte Haus steht am Ufer eines stillen Sees",
    21: "Eine Katze schläft auf dem warmen Dach in der Sonne",
    22: "Der Zug fährt durch die grünen Berge nach Süden",
    23: "Una casa blanca junto al mar con un jardín de flores",
    6: "ok", 14: "two words", 15: "a b c",
    11: "IMG_1234.JPG", 24: "DSC_0042.JPG",
}
SIZES = {7: (150, 300), 11: (900, 250), 19: (200, 200)}
FAULT_CODES = {3: "http_4xx", 9: "blocked_scheme", 17: "decode_error", 20: "decode_error"}  # what each fault is
CAPTION_KINDS = {**{r: "non_english" for r in (5, 13, 21, 22, 23)}, 11: "boilerplate", 24: "boilerplate"}
DOWNLOAD_ARGS = ("--resize-mode", "no", "--samples-per-shard", str(SHARD_SIZE), "--timeout", "2", "--deadline", "4",
                 "--no-progress")


def caption_of(row: int) -> str:
    return CAPTIONS.get(row, f"a photo of a colourful thing number {row}")


def write_tiny_config(folder: Path) -> Path:
    path = folder / "curate-test-tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def _image(row: int) -> bytes:
    src = SAME_BYTES.get(row, row)
    data = jpeg_bytes(color_image(src, SIZES.get(src, (256, 240))))
    if row in TRUNCATED:
        return data[: len(data) // 2]
    return data


def _serve(server: LoopServer) -> list[str]:
    urls = []
    for r in range(N_ROWS):
        if r in FTP:
            urls.append(f"ftp://127.0.0.1/{r}.jpg")
        elif r in HTTP_404:
            urls.append(server.url(f"/missing/{r}.jpg"))
        elif r in NOT_AN_IMAGE:
            urls.append(server.image(f"/img/{r}.jpg", b"<html>not an image</html>"))
        else:
            urls.append(server.image(f"/img/{r}.jpg", _image(r)))
    return urls


def _download(urls: list[str], captions: list[str], out: Path, server: LoopServer) -> None:
    inp = out.parent / f"{out.name}-urls.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": captions,
                             "SAMPLE_ID": [f"s{i:03d}" for i in range(len(urls))]}), inp)
    assert main(["download", str(inp), "--out", str(out), "--url-col", "URL", "--caption-col", "TEXT",
                 "--keep-col", "SAMPLE_ID", "--allow-host", server.endpoint, *DOWNLOAD_ARGS]) == 0


def score_args(root: Path, model: Path) -> list[str]:
    return ["score", str(root), "--model", str(model), "--pretrained", "none", "--batch-size", "16",
            "--loader-workers", "0", "--no-progress"]


def build_pipeline_dataset(folder: Path, model: Path) -> Path:
    """Run download, score and dedup (and an evaluation set's download and score); returns the dataset dir."""
    server = LoopServer()
    try:
        urls = _serve(server)
        out = folder / "ds"
        _download(urls, [caption_of(r) for r in range(N_ROWS)], out, server)
        evalset = folder / "eval"
        _download([urls[r] for r in sorted(EVAL_ROWS)], ["an evaluation image"] * len(EVAL_ROWS), evalset, server)
    finally:
        server.close()
    for root in (out, evalset):
        assert main(score_args(root, model)) == 0
    assert main(["dedup", str(out), "--against", str(evalset), "--device", "cpu", "--threshold", "0.9999",
                 "--eval-threshold", "0.9999", "--no-phash", "--no-progress"]) == 0
    return out


def rows(root: Path) -> list[dict[str, Any]]:
    """One dict per ledger row, in key order: the ledger's columns, then score's and dedup's (None where a
    stage wrote no row), as the stages wrote them."""
    ds = DatasetDir.at(root)
    out = {r["key"]: dict(r) for r in read_tables(ds.ledger_files()).to_pylist()}
    for stage in ("score", "dedup"):
        table = read_tables(ds.signal_files(stage)).to_pylist() if ds.signal_files(stage) else []
        names = set().union(*(t.keys() for t in table)) - {"key"}
        for rec in out.values():
            rec.update({n: None for n in names if n not in rec})
        for t in table:
            out[t["key"]].update({k: v for k, v in t.items() if k != "key"})
    return [out[k] for k in sorted(out)]


def plant(root: Path, stage: str, column: str, values: dict[str, Any]) -> None:
    """Overwrite `column` of `stage`'s signal tables for the keys in `values`, keeping the type the stage
    wrote: for tests whose point needs values a tiny random model cannot give (policy thresholds)."""
    ds = DatasetDir.at(root)
    for path in ds.signal_files(stage):
        table = pq.read_table(path)
        col = table.column(column).to_pylist()
        new = [values.get(k, v) for k, v in zip(table.column("key").to_pylist(), col, strict=True)]
        i = table.schema.get_field_index(column)
        write_table(path, table.set_column(i, table.schema.field(i), pa.array(new, table.schema.field(i).type)))


def write_ground_truth(path: Path) -> Path:
    """What the input planted, in the demo web's ground-truth format (`curate report --ground-truth`)."""
    recs = [{"SAMPLE_ID": f"s{r:03d}", "TEXT": caption_of(r), "expected_error_code": FAULT_CODES.get(r),
             "dup_of": f"s{SAME_BYTES[r]:03d}" if r in SAME_BYTES else None,
             "dup_kind": "exact" if r in SAME_BYTES else None, "caption_kind": CAPTION_KINDS.get(r, "clean")}
            for r in range(N_ROWS)]
    write_table(path, pa.Table.from_pylist(recs))
    return path
