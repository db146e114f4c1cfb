"""`curate download` end to end on loopback: ledger completeness, safety, resize, resume, retry-failed, engines."""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_fetch import LoopServer, jpeg

from curate.cli import main
from curate.imaging import ImageOptions, ImageRejected, process_image
from curate.io.layout import DatasetDir, sample_key, shard_name
from curate.io.shards import iter_samples
from curate.io.tables import read_tables


@pytest.fixture
def server():
    s = LoopServer()
    yield s
    s.close()


def write_urls(path: Path, urls: list[str | None], **extra: list) -> Path:
    data = {"URL": urls, "TEXT": [f"caption {i}" for i in range(len(urls))],
            "SAMPLE_ID": [f"s{i:04d}" for i in range(len(urls))], **extra}
    pq.write_table(pa.table(data), path)
    return path


def download(inp: Path, out: Path, server: LoopServer, *args: str) -> int:
    return main(["download", str(inp), "--out", str(out), "--url-col", "URL", "--caption-col", "TEXT",
                 "--keep-col", "SAMPLE_ID", "--allow-host", server.endpoint, "--timeout", "2", "--deadline", "4",
                 "--image-size", "32", "--no-progress", *args])


def ledger(out: Path) -> pa.Table:
    return read_tables(DatasetDir.at(out).ledger_files())


def tar_samples(out: Path) -> dict[str, dict]:
    ds = DatasetDir.at(out)
    return {s["key"]: s for shard in ds.shards() for s in iter_samples(ds.shard_tar(shard))}


def bomb_png(w: int, h: int) -> bytes:
    """A valid RGB PNG of w x h black pixels, compressed row block by row block (never held raw)."""
    comp = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * w)
    parts = [comp.compress(row * 256) for _ in range(h // 256)] + [comp.compress(row * (h % 256)), comp.flush()]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def test_every_row_in_ledger_with_expected_codes(server, tmp_path):
    urls = [server.image(f"/ok{i}.jpg", jpeg(80, 60, (i * 20, 100, 50))) for i in range(5)]
    server.image("/noai.jpg", headers={"X-Robots-Tag": "noai"})
    server.image("/html", b"<html>gone</html>", ctype="text/html")
    server.image("/tiff", b"II*\x00" + b"\0" * 100, ctype="image/tiff")
    server.image("/tall.jpg", jpeg(20, 200))
    server.image("/tiny.jpg", jpeg(8, 8))
    rows = urls + [
        server.url("/noai.jpg"), server.url("/html"), server.url("/tiff"), server.url("/missing"),
        server.url("/tall.jpg"), server.url("/tiny.jpg"), urls[1] + "#frag", None, "file:///etc/passwd",
    ]
    inp = write_urls(tmp_path / "urls.parquet", rows)
    out = tmp_path / "ds"
    assert download(inp, out, server, "--samples-per-shard", "4", "--min-image-size", "10",
                    "--max-aspect-ratio", "5") == 0
    t = ledger(out).to_pylist()
    assert [r["SAMPLE_ID"] for r in t] == [f"s{i:04d}" for i in range(len(rows))]
    assert [r["key"] for r in t] == [sample_key(shard_name(i // 4), i % 4) for i in range(len(rows))]
    assert [r["shard"] for r in t] == [shard_name(i // 4) for i in range(len(rows))]
    codes = [r["status"] for r in t]
    assert codes == ["success"] * 5 + ["opted_out", "decode_error", "format_not_allowed", "http_4xx",
                                       "bad_aspect_ratio", "too_small", "duplicate_url", "invalid_url",
                                       "blocked_scheme"]
    assert t[11]["duplicate_of"] == t[1]["key"]
    assert t[5]["bytes"] is None and t[5]["sha256"] is None  # opted out: nothing read, nothing stored
    samples = tar_samples(out)
    assert sorted(samples) == [r["key"] for r in t if r["status"] == "success"]
    s = samples[t[0]["key"]]
    assert s["caption"] == "caption 0" and s["meta"]["SAMPLE_ID"] == "s0000"
    assert Image.open(io.BytesIO(s["image"])).size == (43, 32)  # keep_ratio: smaller side = 32
    assert (t[0]["orig_width"], t[0]["orig_height"], t[0]["width"], t[0]["height"]) == (80, 60, 43, 32)
    assert server.hits["/ok1.jpg"] == 1  # the duplicate row did not fetch again
    assert server.hits["/noai.jpg"] == 1


def test_bomb_refused_without_allocating(server, tmp_path):
    # 8000x8000 RGB: below Pillow's own bomb limit, so only curate's --max-pixels stops it; decoding
    # it would take 192 MB
    server.image("/bomb.png", bomb_png(8000, 8000), ctype="image/png")
    inp = write_urls(tmp_path / "urls.parquet", [server.url("/bomb.png")])
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = {"rss": base}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["rss"] = max(peak["rss"], proc.memory_info().rss)
            time.sleep(0.002)

    th = threading.Thread(target=sample)
    th.start()
    try:
        assert download(inp, tmp_path / "ds", server, "--max-pixels", "40000000") == 0
    finally:
        done.set()
        th.join()
    row = ledger(tmp_path / "ds").to_pylist()[0]
    assert row["status"] == "decompression_bomb" and (row["orig_width"], row["orig_height"]) == (8000, 8000)
    assert peak["rss"] - base < 100 * 2**20


def test_process_image_resize_modes_and_orientation():
    src = io.BytesIO()
    im = Image.new("RGB", (400, 200), (10, 200, 10))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90: upright it is 200 x 400
    im.save(src, "JPEG", exif=exif)
    data = src.getvalue()
    want = {"no": (200, 400), "keep_ratio": (100, 200), "keep_ratio_largest": (50, 100),
            "center_crop": (100, 100), "border": (100, 100)}
    for mode, size in want.items():
        out = process_image(data, ImageOptions(image_size=100, resize_mode=mode))
        assert (out.orig_width, out.orig_height) == (200, 400)
        assert Image.open(io.BytesIO(out.data)).size == size, mode
    for fmt, pil in (("png", "PNG"), ("webp", "WEBP")):
        out = process_image(data, ImageOptions(image_size=64, encode_format=fmt))
        assert Image.open(io.BytesIO(out.data)).format == pil
    rgba = io.BytesIO()
    Image.new("RGBA", (50, 50), (0, 0, 0, 0)).save(rgba, "PNG")
    out = process_image(rgba.getvalue(), ImageOptions(image_size=50))
    assert Image.open(io.BytesIO(out.data)).getpixel((25, 25))[0] > 240  # transparent -> white
    gif = io.BytesIO()
    Image.new("P", (30, 30)).save(gif, "GIF")
    assert process_image(gif.getvalue(), ImageOptions(image_size=30)).mime == "image/gif"
    with pytest.raises(ImageRejected) as ei:
        process_image(jpeg()[:200], ImageOptions())
    assert ei.value.code == "decode_error"


def test_missing_column_exits_2_and_writes_nothing(tmp_path):
    inp = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"link": ["http://x/a.jpg"]}), inp)
    out = tmp_path / "ds"
    rc = main(["download", str(inp), "--out", str(out), "--url-col", "URL", "--no-progress"])
    assert rc == 2 and not out.exists()
    rc = main(["download", str(tmp_path / "nope.parquet"), "--out", str(out), "--no-progress"])
    assert rc == 2 and not out.exists()


def test_retry_failed_retries_only_transient_rows(server, tmp_path):
    state = {"down": True}
    server.image("/ok.jpg")
    server.routes["/flaky.jpg"] = lambda h, n: (h.send(503, b"", "text/plain") if state["down"]
                                                else h.send(200, jpeg()))
    inp = write_urls(tmp_path / "urls.parquet", [server.url("/ok.jpg"), server.url("/flaky.jpg"),
                                                  server.url("/missing")])
    out = tmp_path / "ds"
    assert download(inp, out, server, "--retries", "0", "--samples-per-shard", "2") == 0
    assert [r["status"] for r in ledger(out).to_pylist()] == ["success", "http_5xx", "http_4xx"]
    state["down"] = False
    assert download(inp, out, server, "--retries", "0", "--samples-per-shard", "2", "--retry-failed") == 0
    t = ledger(out).to_pylist()
    assert [(r["key"], r["status"], r["superseded_by"]) for r in t] == [
        ("0000000000000", "success", None), ("0000000000001", "http_5xx", "0000000200000"),
        ("0000000100000", "http_4xx", None), ("0000000200000", "success", None)]
    assert t[3]["row"] == 1
    assert server.hits["/ok.jpg"] == 1 and server.hits["/missing"] == 1  # never re-fetched
    # a second --retry-failed has nothing left to retry; a plain rerun changes nothing
    assert download(inp, out, server, "--retries", "0", "--samples-per-shard", "2", "--retry-failed") == 0
    assert ledger(out).num_rows == 4 and len(tar_samples(out)) == 2


def test_resume_refuses_other_config(server, tmp_path):
    inp = write_urls(tmp_path / "urls.parquet", [server.image("/a.jpg")])
    out = tmp_path / "ds"
    assert download(inp, out, server) == 0
    assert server.hits["/a.jpg"] == 1
    assert download(inp, out, server, "--threads", "3") == 0  # runtime option: resumes
    assert server.hits["/a.jpg"] == 1  # the done shard was skipped, not fetched again
    assert download(inp, out, server, "--image-size", "64") == 2  # another config: refused
    assert server.hits["/a.jpg"] == 1
    assert download(inp, out, server, "--image-size", "64", "--redo") == 0
    assert server.hits["/a.jpg"] == 2
    row = ledger(out).to_pylist()[0]
    assert min(row["width"], row["height"]) == 64  # recomputed with the new config


def test_demo_web_every_fault_accounted_for(tmp_path):
    from curate.demo.web import DemoWeb, WebConfig

    cfg = WebConfig(seed=0, n=120, fault_rate=0.4, slow_seconds=20, drip_interval=0.2)
    with DemoWeb(cfg, tmp_path / "web") as web:
        argv = ["download", str(web.url_list), "--out", str(tmp_path / "ds"), "--preset", "laion",
                "--keep-col", "SAMPLE_ID", "--timeout", "1", "--deadline", "4", "--image-size", "64",
                "--samples-per-shard", "40", "--no-progress"]
        for h in web.allow_hosts:
            argv += ["--allow-host", h]
        assert main(argv) == 0
        assert web.canary_hits == 0
        truth = pq.read_table(web.ground_truth).to_pylist()
    led = {r["SAMPLE_ID"]: r for r in ledger(tmp_path / "ds").to_pylist()}
    assert len(led) == len(truth)
    wrong = [(t["SAMPLE_ID"], t["fault"], t["expected_error_code"], led[t["SAMPLE_ID"]]["error_code"])
             for t in truth if led[t["SAMPLE_ID"]]["error_code"] != t["expected_error_code"]]
    assert not wrong
    faults = {t["fault"] for t in truth if t["fault"]}
    assert {"bomb", "drip", "redirect_canary", "too_large", "noai", "503_then_200"} <= faults


@pytest.mark.slow
def test_sigkill_then_rerun_gives_every_row_once(server, tmp_path):
    def slow_image(h, n):
        time.sleep(0.05)
        h.send(200, jpeg())

    urls = []
    for i in range(120):
        server.routes[f"/k{i}.jpg"] = slow_image
        urls.append(server.url(f"/k{i}.jpg"))
    inp = write_urls(tmp_path / "urls.parquet", urls)
    out = tmp_path / "ds"
    argv = [sys.executable, "-m", "curate.cli", "download", str(inp), "--out", str(out), "--url-col", "URL",
            "--caption-col", "TEXT", "--keep-col", "SAMPLE_ID", "--allow-host", server.endpoint,
            "--samples-per-shard", "10", "--threads", "2", "--per-host", "2", "--workers", "2",
            "--image-size", "32", "--no-progress"]
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = out / "_done" / "download"
    t0 = time.time()
    while time.time() - t0 < 60 and len(list(markers.glob("*.json")) if markers.exists() else []) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker processes, mid-run
    proc.wait()
    assert len(list(markers.glob("*.json"))) < 12
    assert subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    t = ledger(out).to_pylist()
    assert sorted(r["SAMPLE_ID"] for r in t) == [f"s{i:04d}" for i in range(120)]
    samples = tar_samples(out)  # reads every tar to its end-of-archive marker
    assert len(samples) == 120 and all(r["status"] == "success" for r in t)
    # the rerun removed what the killed attempts left behind
    assert not list(out.rglob(".tmp-*")) and all(p.name.endswith(".tar") for p in (out / "shards").glob("0*"))


@pytest.mark.spark
def test_local_and_spark_give_the_same_outputs(server, tmp_path, monkeypatch):
    pytest.importorskip("pyspark")
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    urls = [server.image(f"/s{i}.jpg", jpeg(60 + i, 40, (i * 9, 50, 200))) for i in range(9)]
    urls += [server.url("/missing"), urls[0], "ftp://x/y"]
    inp = write_urls(tmp_path / "urls.parquet", urls)
    assert download(inp, tmp_path / "local", server, "--samples-per-shard", "4", "--workers", "2") == 0
    assert download(inp, tmp_path / "spark", server, "--samples-per-shard", "4", "--engine", "spark",
                    "--spark-master", "local[2]") == 0
    a, b = ledger(tmp_path / "local").drop(["elapsed"]), ledger(tmp_path / "spark").drop(["elapsed"])
    assert a.equals(b)
    for shard in DatasetDir.at(tmp_path / "local").shards():
        assert (tmp_path / "local" / "shards" / f"{shard}.tar").read_bytes() == \
               (tmp_path / "spark" / "shards" / f"{shard}.tar").read_bytes()


def test_retry_marks_the_right_ledger_past_99999_shards(tmp_path):
    """retry_of keys of shards 99,999 and 100,000 name their own ledgers (the old `retry_of[:5]` did not)."""
    from curate.io.ledger import LEDGER_FIELDS
    from curate.io.tables import write_table
    from curate.stages.download import _mark_superseded, slice_path

    ds = DatasetDir.at(tmp_path)
    schema = pa.schema(LEDGER_FIELDS)
    olds = [shard_name(99_999), shard_name(100_000), shard_name(1_000_000)]
    for s in olds:
        rows = [{"key": sample_key(s, j), "shard": s, "row": j, "status": "timeout", "error_code": "timeout"}
                for j in range(3)]
        write_table(ds.ledger(s), pa.Table.from_pylist(rows, schema=schema))
    retry = shard_name(1_000_001)
    retry_of = [sample_key(olds[0], 2), sample_key(olds[1], 0), sample_key(olds[2], 1)]
    write_table(slice_path(ds, retry), pa.table({"key": [sample_key(retry, j) for j in range(3)],
                                                 "retry_of": retry_of}))
    assert _mark_superseded(ds, retry) == 3
    sup = {s: pq.read_table(ds.ledger(s)).column("superseded_by").to_pylist() for s in olds}
    assert sup == {olds[0]: [None, None, sample_key(retry, 0)], olds[1]: [sample_key(retry, 1), None, None],
                   olds[2]: [None, sample_key(retry, 2), None]}
