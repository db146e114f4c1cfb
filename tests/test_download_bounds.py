"""Download's per-sample bounds end to end: a shard never waits forever for one row, hostile servers and
hostile images end as ledger rows with their codes, within the deadline."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from loopback import jpeg
from test_deadline import PHASES
from test_imaging import png

import curate.stages.download as dl
from curate.cli import main
from curate.io.layout import DatasetDir
from curate.io.tables import read_tables


def run(inp: Path, out: Path, *args: str) -> int:
    # in this process (--workers 1), so the steps a test patches are the ones that run
    return main(["download", str(inp), "--out", str(out), "--no-progress", "--image-size", "32", "--workers", "1",
                 *args])


def ledger(out: Path) -> list[dict]:
    return read_tables(DatasetDir.at(out).ledger_files()).to_pylist()


def run_with_a_hang(server, tmp_path: Path, urls: list[str], release: threading.Event) -> tuple[list[dict], float]:
    """Download `urls` while a patched step hangs until `release` (set however the run ends): (ledger, seconds)."""
    inp = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": urls}), inp)
    t0 = time.monotonic()
    try:
        assert run(inp, tmp_path / "ds", "--allow-host", server.endpoint, "--deadline", "0.5",
                   "--threads", "2", "--per-host", "2") == 0
        took = time.monotonic() - t0
    finally:
        release.set()
    return ledger(tmp_path / "ds"), took


def test_writer_gives_up_on_a_stuck_row_and_the_shard_completes(server, tmp_path, monkeypatch):
    urls = [server.image(f"/ok{i}.jpg", jpeg(40, 30)) for i in range(8)]
    urls[2] = server.url("/stuck.jpg")
    real = dl._fetch_row
    release = threading.Event()

    def fetch(row, fetcher):
        if row["url"].endswith("/stuck.jpg"):
            release.wait(60)  # stands for a hang no deadline reaches (a bug, a stuck system call)
        return real(row, fetcher)

    monkeypatch.setattr(dl, "_fetch_row", fetch)
    monkeypatch.setattr(dl, "WRITER_GRACE", 0.5)
    rows, took = run_with_a_hang(server, tmp_path, urls, release)
    assert [r["status"] for r in rows] == ["success"] * 2 + ["deadline_exceeded"] + ["success"] * 5
    assert "went on without it" in rows[2]["error_message"]
    assert took < 15


@pytest.mark.parametrize("slow_row", [None, 2])
def test_writer_gives_up_on_a_row_stuck_in_decoding_and_the_shard_completes(server, tmp_path, monkeypatch,
                                                                           slow_row):
    # the decode threads are few (default 2, here 1): one that hangs must not hold back the rows after it.
    # slow_row=2: row 2's fetch is slow, so row 3 reaches the only decode thread (and hangs there) first
    # and row 2 waits in the queue behind it: the writer, waiting for row 2, must add a decode thread
    urls = [server.image(f"/ok{i}.jpg", jpeg(40, 30)) for i in range(8)]
    urls[3] = server.image("/stuck.jpg", jpeg(40, 30))
    real = dl._decode_row
    real_fetch = dl._fetch_row
    release = threading.Event()

    def fetch(row, fetcher):
        if slow_row is not None and row["row"] == slow_row:
            time.sleep(0.4)
        return real_fetch(row, fetcher)

    monkeypatch.setattr(dl, "_fetch_row", fetch)

    def decode(res, body, opt, budget=None):
        if res.ledger["url"].endswith("/stuck.jpg"):
            release.wait(60)  # a hang inside the pixel work (a decoder bug)
        return real(res, body, opt, budget)

    monkeypatch.setattr(dl, "_decode_row", decode)
    monkeypatch.setattr(dl, "WRITER_GRACE", 0.5)
    real_shard = dl.run_shard
    monkeypatch.setattr(dl, "run_shard", lambda cfg, ds, task: real_shard(replace(cfg, decode_threads=1), ds, task))
    rows, took = run_with_a_hang(server, tmp_path, urls, release)
    assert [r["status"] for r in rows] == ["success"] * 3 + ["deadline_exceeded"] + ["success"] * 4
    assert took < 15


def test_hostile_servers_in_a_real_download_end_by_the_deadline(raw, tmp_path):
    for path, route in PHASES.items():
        raw.routes[path] = route
    inp = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [raw.url(p) for p in sorted(PHASES)]}), inp)
    t0 = time.monotonic()
    assert run(inp, tmp_path / "ds", "--allow-host", raw.endpoint, "--deadline", "1.5", "--timeout", "5",
               "--threads", "16", "--per-host", "16") == 0
    took = time.monotonic() - t0
    rows = ledger(tmp_path / "ds")
    assert {r["status"] for r in rows} == {"deadline_exceeded"}
    assert all(r["elapsed"] < 1.5 + 2 for r in rows)
    assert took < 15


def test_hostile_images_get_their_codes(server, tmp_path):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    urls = [server.image("/thin.png", png(1, 100_000), ctype="image/png"),
            server.image("/wide.png", png(100_000, 1), ctype="image/png"),
            server.image("/eps.jpg", eps), server.image("/ppm.jpg", b"P6\n2 2\n255\n" + b"\0" * 12),
            server.image("/pgm.jpg", b"P5\n2 2\n255\n\0\0\0\0"),
            server.image("/big.png", png(7000, 7000), ctype="image/png"),
            server.image("/ok.png", png(64, 48, (200, 10, 10)), ctype="image/png")]
    inp = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": urls}), inp)
    assert run(inp, tmp_path / "ds", "--allow-host", server.endpoint) == 0
    assert [r["status"] for r in ledger(tmp_path / "ds")] == [
        "bad_aspect_ratio", "bad_aspect_ratio", "format_not_allowed", "format_not_allowed", "format_not_allowed",
        "decompression_bomb", "success"]


def test_profile_reports_every_phase(server, tmp_path):
    import json
    import os
    import subprocess
    import sys

    urls = [server.image(f"/p{i}.jpg", jpeg(80, 60)) for i in range(6)]
    inp = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": urls}), inp)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, CURATE_PROFILE="1", PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    r = subprocess.run([sys.executable, "-m", "curate.cli", "download", str(inp), "--out", str(tmp_path / "ds"),
                        "--allow-host", server.endpoint, "--no-progress", "--image-size", "32"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (stats_file,) = (tmp_path / "ds" / "stats" / "download").glob("*.json")
    stats = json.loads(stats_file.read_text())
    phases = stats["phases"]
    assert set(phases) == {"connect", "headers", "body", "decode", "resize", "encode", "hash", "write", "ledger"}
    assert all(v["cpu"] >= 0 for v in phases.values()) and stats["cpu_seconds"] > 0
    assert phases["decode"]["count"] == 6 and phases["write"]["count"] == 6 and phases["connect"]["count"] >= 1
