"""`curate download` end to end on loopback: ledger completeness, safety, resize, resume, retry-failed, engines."""

from __future__ import annotations

import io
import json
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
from helpers import crash_env
from loopback import LoopServer, jpeg
from PIL import Image

from curate.cli import main
from curate.imaging import ImageOptions, ImageRejected, process_image
from curate.io.layout import DatasetDir, sample_key, shard_name
from curate.io.shards import iter_samples
from curate.io.tables import read_tables


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

    # a seed whose first 120 rows hold every fault asserted below (the draw depends on the shipped corpus)
    cfg = WebConfig(seed=2, n=120, fault_rate=0.4, slow_seconds=20, drip_interval=0.2)
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
    # and gives what a clean run gives, byte for byte
    clean = tmp_path / "clean"
    assert subprocess.run([*argv[:6], str(clean), *argv[7:]], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0
    _same_outputs(clean, out)
    # killing one worker (one task) mid-run: the run itself recovers and still gives the same outputs
    again = tmp_path / "again"
    proc = subprocess.Popen([*argv[:6], str(again), *argv[7:]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: len(list((again / "_done" / "download").glob("*.json"))) >= 2
              if (again / "_done" / "download").exists() else False)
    victim = next(c for c in psutil.Process(proc.pid).children(recursive=True) if "spawn_main" in " ".join(c.cmdline()))
    victim.kill()
    assert proc.wait(timeout=120) == 0
    _same_outputs(clean, again)


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
    from curate.stages.download import mark_superseded, slice_path

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
    assert mark_superseded(ds, [retry]) == 3
    sup = {s: pq.read_table(ds.ledger(s)).column("superseded_by").to_pylist() for s in olds}
    assert sup == {olds[0]: [None, None, sample_key(retry, 0)], olds[1]: [sample_key(retry, 1), None, None],
                   olds[2]: [None, sample_key(retry, 2), None]}


def test_text_that_is_not_utf8_gets_a_row_code_never_a_traceback(server, tmp_path):
    ok = server.image("/u.jpg")
    urls = pa.array([ok.encode(), ok.encode() + b"?\xff", b"http://127.0.0.1:1/x.jpg"], pa.binary()).view(pa.string())
    caps = pa.array([b"fine", b"fine", b"caf\xe9"], pa.binary()).view(pa.string())
    inp = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": caps, "SAMPLE_ID": ["a", "b", "c"]}), inp)
    assert download(inp, tmp_path / "ds", server) == 0
    t = ledger(tmp_path / "ds").to_pylist()
    assert [r["status"] for r in t] == ["success", "invalid_url", "invalid_text"]
    assert t[2]["caption"] == "caf\ufffd" and "TEXT" in t[2]["error_message"]
    assert server.hits["/u.jpg"] == 1


def test_plan_is_made_once_and_reused(server, tmp_path):
    inp = write_urls(tmp_path / "urls.parquet", [server.image(f"/p{i}.jpg") for i in range(5)] + [None])
    out = tmp_path / "ds"
    assert main(["download", str(inp), "--out", str(out), "--url-col", "URL", "--allow-host", server.endpoint,
                 "--samples-per-shard", "2", "--plan-only", "--no-progress"]) == 0
    ds = DatasetDir.at(out)
    assert ds.plan_file.exists() and not ds.done_tasks("download") and sum(server.hits.values()) == 0
    stamp = {p: p.stat().st_mtime_ns for p in ds.inputs_dir.glob("*.parquet")}
    assert len(stamp) == 3 + 1  # three slices and the duplicates file
    assert main(["download", str(inp), "--out", str(out), "--url-col", "URL", "--allow-host", server.endpoint,
                 "--samples-per-shard", "2", "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in ds.inputs_dir.glob("*.parquet")} == stamp  # not planned again
    assert len(ds.done_tasks("download")) == 3 and ledger(out).num_rows == 6


# ---- engines, arrays, locks, kills ---------------------------------------------------------------

def _mixed_urls(server: LoopServer, n: int = 14) -> list[str | None]:
    urls: list[str | None] = [server.image(f"/m{i}.jpg", jpeg(50 + i, 40, (i * 15, 90, 30))) for i in range(n)]
    return urls + [server.url("/missing"), urls[2], "ftp://x/y", None]


def _cli(inp: Path, out: Path, server: LoopServer, *args: str) -> list[str]:
    return [sys.executable, "-m", "curate.cli", "download", str(inp), "--out", str(out), "--url-col", "URL",
            "--caption-col", "TEXT", "--keep-col", "SAMPLE_ID", "--allow-host", server.endpoint, "--timeout", "2",
            "--deadline", "4", "--image-size", "32", "--no-progress", *args]


def _same_outputs(a: Path, b: Path) -> None:
    la, lb = ledger(a).drop(["elapsed"]), ledger(b).drop(["elapsed"])
    assert la.num_rows > 0 and la.equals(lb)
    tars = sorted(p.name for p in (a / "shards").glob("*.tar"))
    assert tars and tars == sorted(p.name for p in (b / "shards").glob("*.tar"))
    for name in tars:
        assert (a / "shards" / name).read_bytes() == (b / "shards" / name).read_bytes(), name


def test_one_and_two_workers_and_concurrent_array_tasks_give_identical_outputs(server, tmp_path):
    inp = write_urls(tmp_path / "urls.parquet", _mixed_urls(server))
    assert download(inp, tmp_path / "w1", server, "--samples-per-shard", "3") == 0
    assert download(inp, tmp_path / "w2", server, "--samples-per-shard", "3", "--workers", "2") == 0
    _same_outputs(tmp_path / "w1", tmp_path / "w2")
    out = tmp_path / "array"
    # a Slurm array: one plan job, then every index at once, as concurrent processes
    assert subprocess.run(_cli(inp, out, server, "--samples-per-shard", "3", "--plan-only")).returncode == 0
    n = 3
    procs = [subprocess.Popen(_cli(inp, out, server, "--samples-per-shard", "3", "--num-shards", str(n)),
                              env={**os.environ, "SLURM_ARRAY_TASK_ID": str(i)}, stderr=subprocess.PIPE)
             for i in range(n)]
    errs = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * n, errs
    _same_outputs(tmp_path / "w1", out)
    from curate.io import manifest

    entry = manifest.load(DatasetDir.at(out))["stages"]["download"]
    assert entry["status"] == "complete" and entry["slices"] == {f"{i}-of-{n}": "complete" for i in range(n)}
    assert entry["counts"]["rows"] == 18
    assert len(list((out / "_manifest" / "download").glob("*.json"))) == n  # one fragment per task


def test_array_tasks_refuse_to_plan_and_to_redo(server, tmp_path):
    inp = write_urls(tmp_path / "urls.parquet", [server.image("/r.jpg")])
    out = tmp_path / "ds"
    assert download(inp, out, server, "--shard-index", "1", "--num-shards", "2") == 2
    assert not (out / "_inputs" / "plan.json").exists()
    assert download(inp, out, server, "--plan-only") == 0
    assert download(inp, out, server, "--shard-index", "1", "--num-shards", "2", "--redo") == 2
    assert download(inp, out, server, "--shard-index", "0", "--num-shards", "2") == 0
    assert ledger(out).num_rows == 1


def _wait_for(cond, timeout: float = 60) -> None:
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def _slow_server(server: LoopServer, n: int, delay: float = 0.2) -> list[str]:
    def slow(h, _n):
        time.sleep(delay)
        h.send(200, jpeg())

    for i in range(n):
        server.routes[f"/slow{i}.jpg"] = slow
    return [server.url(f"/slow{i}.jpg") for i in range(n)]


def test_second_run_on_the_same_directory_exits_2_and_a_dead_lock_is_taken_over(server, tmp_path):
    inp = write_urls(tmp_path / "urls.parquet", _slow_server(server, 40))
    out = tmp_path / "ds"
    first = subprocess.Popen(_cli(inp, out, server, "--samples-per-shard", "5", "--threads", "1"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (out / "_done" / "download").is_dir())
        second = subprocess.run(_cli(inp, out, server, "--samples-per-shard", "5"), capture_output=True, text=True)
        assert second.returncode == 2
        assert "another `curate download` run" in second.stderr and f"pid {first.pid}" in second.stderr
        assert first.poll() is None  # the first run is untouched and goes on
    finally:
        first.kill()
        first.wait()
    # the first run was SIGKILLed: its lock file names a dead pid; the next run takes it over and removes
    # every temp file that run left, however young
    ds = DatasetDir.at(out)
    assert f'"pid": {first.pid}' in ds.lock("download").read_text()
    from curate.io import manifest

    assert manifest.load(ds)["stages"]["download"]["status"] == "interrupted"  # never left "running"
    young = [out / "shards" / ".tmp-0123456789ab-00000007.tar", out / ".tmp-0123456789ab-manifest.json",
             out / "_inputs" / ".tmp-0123456789ab-plan.json"]
    for p in young:
        p.write_bytes(b"left by a killed run a moment ago")
    assert subprocess.run(_cli(inp, out, server, "--samples-per-shard", "5"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    assert not any(p.exists() for p in young) and not list(out.rglob(".tmp-*"))
    assert ledger(out).num_rows == 40 and manifest.load(ds)["stages"]["download"]["status"] == "complete"


def test_local_workers_die_with_their_driver(server, tmp_path):
    inp = write_urls(tmp_path / "urls.parquet", _slow_server(server, 60, delay=0.5))
    out = tmp_path / "ds"
    driver = subprocess.Popen(_cli(inp, out, server, "--samples-per-shard", "5", "--threads", "1",
                                   "--workers", "2"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: sum(server.hits.values()) >= 2)
        workers = [c for c in psutil.Process(driver.pid).children(recursive=True)
                   if "spawn_main" in " ".join(c.cmdline())]
        assert len(workers) == 3  # two places, and one more process for the shards' ends
        driver.send_signal(signal.SIGKILL)  # the driver alone, not its process group
        driver.wait()
        gone, alive = psutil.wait_procs(workers, timeout=5)
        assert not alive, f"workers outlived their driver: {[p.pid for p in alive]}"
    finally:
        driver.kill()


def test_a_task_whose_worker_dies_is_a_failed_result_and_the_others_finish(server, tmp_path, monkeypatch):
    inp = write_urls(tmp_path / "urls.parquet", [server.image(f"/d{i}.jpg") for i in range(6)])
    out = tmp_path / "ds"
    # the pool's worker processes start with the crash hook armed (the driver, this process, does not)
    for name, value in crash_env(CURATE_TEST_CRASH_TASK="download:00000001").items():
        monkeypatch.setenv(name, value)
    assert download(inp, out, server, "--samples-per-shard", "2", "--workers", "2") == 3
    ds = DatasetDir.at(out)
    assert ds.done_tasks("download") == ["00000000", "00000002"]
    from curate.io import manifest

    entry = manifest.load(ds)["stages"]["download"]
    assert entry["status"] == "incomplete" and entry["shards"]["failed"] == ["00000001"]
    monkeypatch.delenv("CURATE_TEST_CRASH_TASK")
    assert download(inp, out, server, "--samples-per-shard", "2") == 0
    assert ledger(out).num_rows == 6 and manifest.load(ds)["stages"]["download"]["status"] == "complete"


@pytest.mark.spark
def test_spark_reports_a_dead_shard_as_one_failed_result(server, tmp_path, monkeypatch):
    pytest.importorskip("pyspark")
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    from curate.engines.session import get_session

    inp = write_urls(tmp_path / "urls.parquet", [server.image(f"/e{i}.jpg") for i in range(6)])
    out = tmp_path / "ds"
    sc = get_session("local[2]").sparkContext
    # Python workers get sc.environment (Spark merges this PYTHONPATH into theirs), so they load the hook
    hooks = crash_env({}, CURATE_TEST_CRASH_TASK="download:00000001")
    sc.environment.update(hooks)
    try:
        rc = download(inp, out, server, "--samples-per-shard", "2", "--engine", "spark", "--spark-master", "local[2]")
    finally:
        for name in hooks:
            sc.environment.pop(name, None)
    assert rc == 3
    ds = DatasetDir.at(out)
    assert ds.done_tasks("download") == ["00000000", "00000002"]
    from curate.io import manifest

    assert manifest.load(ds)["stages"]["download"]["shards"]["failed"] == ["00000001"]
    assert download(inp, out, server, "--samples-per-shard", "2", "--engine", "spark",
                    "--spark-master", "local[2]") == 0
    assert ledger(out).num_rows == 6


def test_sigterm_records_interrupted_in_the_manifest_itself(server, tmp_path):
    inp = write_urls(tmp_path / "urls.parquet", _slow_server(server, 30))
    out = tmp_path / "ds"
    proc = subprocess.Popen(_cli(inp, out, server, "--samples-per-shard", "5", "--threads", "1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: (out / "_done" / "download").is_dir())
    proc.send_signal(signal.SIGTERM)  # what Slurm sends at the time limit
    assert proc.wait(timeout=30) != 0
    import json

    raw = json.loads((out / "manifest.json").read_text())["stages"]["download"]
    assert raw["status"] == "interrupted"  # written by the run itself, not inferred by a reader


def test_a_slow_row_holds_back_no_other_row_and_the_tar_stays_in_row_order(server, tmp_path):
    """Row 0 takes 8 s to answer; the 300 rows after it (more than the 256 rows a writer in row order
    would let run ahead) are all fetched meanwhile, and the tar still lists the rows in order."""
    arrivals: list[float] = []
    slow_done: list[float] = []

    def slow(h, _n):
        time.sleep(8.0)
        h.send(200, jpeg())
        slow_done.append(time.monotonic())

    def fast(h, _n):
        arrivals.append(time.monotonic())
        h.send(200, jpeg())

    server.routes["/slow.jpg"] = slow
    for i in range(300):
        server.routes[f"/f{i}.jpg"] = fast
    urls = [server.url("/slow.jpg")] + [server.url(f"/f{i}.jpg") for i in range(300)]
    out = tmp_path / "ds"
    assert download(write_urls(tmp_path / "urls.parquet", urls), out, server, "--threads", "8",
                    "--per-host", "8", "--image-size", "16", "--workers", "1", "--timeout", "10",
                    "--deadline", "20") == 0
    assert len(arrivals) == 300 and slow_done and max(arrivals) < slow_done[0]
    t = ledger(out)
    assert t.column("status").to_pylist() == ["success"] * 301
    names = [n for n in iter_tar_names(out) if n.endswith(".jpg")]
    assert names == [f"{k}.jpg" for k in t.column("key").to_pylist()]  # row order, not finishing order


def iter_tar_names(out: Path) -> list[str]:
    import tarfile

    (tar,) = (out / "shards").glob("*.tar")
    with tarfile.open(tar) as tf:
        return tf.getnames()


def test_a_small_input_gets_a_shard_per_worker_and_a_big_one_full_shards(tmp_path):
    """1,200 rows, under one shard of 10,000: two workers get a shard of 600 each (one shard would leave
    a process idle); one worker gets one shard; with 500-row shards, already more than the workers, the
    shards stay full (500, 500, 200). Every row once, in input order."""
    inp = write_urls(tmp_path / "urls.parquet", [f"not a url {i}" for i in range(1200)])

    def sizes(out: Path, *args: str) -> list[int]:
        assert main(["download", str(inp), "--out", str(out), "--url-col", "URL", "--no-progress", *args]) == 0
        led = ledger(out).sort_by("row").to_pylist()
        assert [r["row"] for r in led] == list(range(1200)) and {r["status"] for r in led} == {"invalid_url"}
        return [n for _, n in sorted(json.loads(DatasetDir.at(out).plan_file.read_text())["shards"].items())]

    assert sizes(tmp_path / "w2", "--workers", "2") == [600, 600]
    assert sizes(tmp_path / "w1", "--workers", "1") == [1200]
    assert sizes(tmp_path / "full", "--workers", "2", "--samples-per-shard", "500") == [500, 500, 200]


def test_a_shards_slow_tail_overlaps_the_next_shards_work(server, tmp_path):
    """Two workers, four shards of three rows, the last row of each taking 4 s to answer. Once a shard has
    started every row and only waits, it gives its place up: the third shard starts while the first slow
    answers are still on their way (one at a time, it would wait for them), and not before a first shard
    has started all its rows (two places: at most two shards work at once)."""
    arrived: dict[int, float] = {}
    ends: list[float] = []
    lock = threading.Lock()

    def route(i: int):
        def answer(h, n):
            with lock:
                arrived.setdefault(i, time.monotonic())
            if i % 3 == 2:
                time.sleep(4.0)
                with lock:
                    ends.append(time.monotonic())
            h.send(200, jpeg())
        return answer

    urls = []
    for i in range(12):
        server.routes[f"/o{i}.jpg"] = route(i)
        urls.append(server.url(f"/o{i}.jpg"))
    inp = write_urls(tmp_path / "urls.parquet", urls)
    assert download(inp, tmp_path / "ds", server, "--samples-per-shard", "3", "--workers", "2",
                    "--deadline", "10", "--timeout", "8") == 0
    assert ledger(tmp_path / "ds").column("status").to_pylist() == ["success"] * 12
    assert len(ends) == 4
    starts = sorted(min(arrived[i] for i in range(k, k + 3)) for k in range(0, 12, 3))
    assert starts[2] < min(ends), (starts, ends)  # beside the first slow tails, not after them
    assert starts[2] > min(arrived[i] for i in (2, 5, 8, 11))  # not before a first shard had started all its rows
