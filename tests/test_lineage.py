"""Lineage end to end with the real stages on a loopback web: one shard downloaded again is rescored alone,
dedup re-plans over the new embeddings, stale signals are never joined, and an export made before refuses
(or rebuilds with --redo); after --retry-failed every summary counts each input row once."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from dataset_factory import color_image, jpeg_bytes
from loopback import LoopServer
from pipeline_data import score_args

from curate.cli import main
from curate.io import manifest
from curate.io.layout import DatasetDir
from curate.io.tables import read_tables

N, PER_SHARD = 12, 4  # shards 00000000 .. 00000002


def _download(inp: Path, out: Path, server: LoopServer, *args: str) -> int:
    return main(["download", str(inp), "--out", str(out), "--url-col", "URL", "--caption-col", "TEXT",
                 "--allow-host", server.endpoint, "--timeout", "2", "--deadline", "4", "--resize-mode", "no",
                 "--samples-per-shard", str(PER_SHARD), "--no-progress", *args])


def _urls(server: LoopServer, tmp: Path) -> Path:
    urls = [server.image(f"/img/{r}.jpg", jpeg_bytes(color_image(r))) for r in range(N)]
    inp = tmp / "urls.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"a photo of thing {r}" for r in range(N)]}), inp)
    return inp


def _markers(root: Path, stage: str) -> dict[str, bytes]:
    folder = root / "_done" / stage
    return {p.stem: p.read_bytes() for p in sorted(folder.glob("*.json"))}


def _dedup(root: Path, *args: str) -> int:
    return main(["dedup", str(root), "--device", "cpu", "--threshold", "0.9999", "--no-progress", *args])


def _export(src: Path, out: Path, *args: str) -> int:
    return main(["export", str(src), "--out", str(out), "--policy", "dedup", "--samples-per-shard", "100", *args])


def test_redo_one_shard_recomputes_exactly_its_signals(tmp_path, tiny_model):
    server = LoopServer()
    try:
        inp = _urls(server, tmp_path)
        ds = tmp_path / "ds"
        assert _download(inp, ds, server) == 0
        assert main(score_args(ds, tiny_model)) == 0
        assert _dedup(ds) == 0
        exported = tmp_path / "export"
        assert _export(ds, exported) == 0
        assert json.loads((exported / "_work" / "export" / "selection.json").read_text())["kept"] == N

        before = {s: _markers(ds, s) for s in ("download", "score")}
        emb_before = {s: (ds / "signals" / "score" / f"{s}.img_emb.npy").read_bytes() for s in before["score"]}
        # shard 00000001 (rows 4..7) changes on the web: row 5 now serves row 0's bytes
        server.image("/img/5.jpg", jpeg_bytes(color_image(0)))
        assert _download(inp, ds, server, "--redo-shard", "00000001") == 0
        after_dl = _markers(ds, "download")
        assert [s for s in after_dl if after_dl[s] != before["download"][s]] == ["00000001"]
        assert server.hits["/img/0.jpg"] == 1  # the other shards were not fetched again

        # until shard 00000001 is scored again, its old signals are never joined with its new images
        assert _dedup(ds) == 2
        assert _export(ds, tmp_path / "other") == 2

        assert main(score_args(ds, tiny_model)) == 0
        after = _markers(ds, "score")
        assert [s for s in after if after[s] != before["score"][s]] == ["00000001"]  # exactly that shard
        emb_after = {s: (ds / "signals" / "score" / f"{s}.img_emb.npy").read_bytes() for s in after}
        assert [s for s in emb_after if emb_after[s] != emb_before[s]] == ["00000001"]
        man = manifest.load(DatasetDir.at(ds))["stages"]["score"]
        assert man["counts"]["rows"] == N

        # dedup reads every shard: it re-plans, and finds the duplicate the new shard brought
        assert _dedup(ds) == 0
        dup = {r["key"]: r for r in read_tables(DatasetDir.at(ds).signal_files("dedup")).to_pylist()}
        assert dup["0000000100001"]["is_duplicate"] != dup["0000000000000"]["is_duplicate"]
        assert sum(bool(r["is_duplicate"]) for r in dup.values()) == 1

        # the export made before refuses to mix selections; --redo rebuilds it from the source as it is now
        assert _export(ds, exported) == 2
        assert _export(ds, exported, "--redo") == 0
        assert json.loads((exported / "_work" / "export" / "selection.json").read_text())["kept"] == N - 1
        # a resume of the rebuilt export with the source unchanged is a no-op
        assert _export(ds, exported) == 0
    finally:
        server.close()


def test_retry_failed_counts_each_input_row_once(tmp_path, tiny_model):
    server = LoopServer()
    state = {"down": True}
    try:
        urls = [server.image(f"/img/{r}.jpg", jpeg_bytes(color_image(r))) for r in range(6)]
        server.routes["/flaky.jpg"] = lambda h, n: (h.send(503, b"", "text/plain") if state["down"]
                                                    else h.send(200, jpeg_bytes(color_image(99))))
        urls += [server.url("/flaky.jpg"), server.url("/missing.jpg")]
        inp = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"URL": urls, "TEXT": [f"thing {r}" for r in range(len(urls))]}), inp)
        ds = tmp_path / "ds"
        assert _download(inp, ds, server, "--retries", "0") == 0
        # scored before the retry: the 503 row is counted as a skipped row of its shard
        assert main(score_args(ds, tiny_model)) == 0
        state["down"] = False
        assert _download(inp, ds, server, "--retries", "0", "--retry-failed") == 0
        assert main(score_args(ds, tiny_model)) == 0
    finally:
        server.close()
    stages = manifest.load(DatasetDir.at(ds))["stages"]
    assert stages["download"]["counts"]["rows"] == len(urls)
    score = stages["score"]["counts"]
    assert score["rows"] == len(urls) and score["superseded"] == 1
    assert score["scored"] == 7 and sum(score["skipped"].values()) == 1  # the 404 only
    out = tmp_path / "export"
    assert main(["export", str(ds), "--out", str(out)]) == 0
    sel = json.loads((out / "_work" / "export" / "selection.json").read_text())
    assert sel["input"] == len(urls) and sel["kept"] == 7
    assert manifest.load(DatasetDir.at(out))["stages"]["export"]["counts"]["input"] == len(urls)
