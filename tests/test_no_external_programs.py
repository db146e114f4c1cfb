"""No stage ever runs an external program on image bytes: EPS bytes named .jpg, with a fake `gs` first on PATH.

The fake `gs` writes a canary file when run. A control run of plain Pillow on the same bytes shows the
canary would catch it (Pillow's EPS plugin calls Ghostscript to decode); then download, report
thumbnails, train-probe data and score decode the same bytes and the canary must stay absent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.io.layout import DatasetDir
from curate.io.tables import read_tables

ROOT = Path(__file__).resolve().parents[1]
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
       b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")


@pytest.fixture
def fake_gs(tmp_path: Path) -> tuple[dict[str, str], Path]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    canary = tmp_path / "gs-was-run"
    gs = bindir / "gs"
    gs.write_text(f"#!/bin/sh\necho \"$@\" >> '{canary}'\nexit 1\n")
    gs.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return env, canary


def run_py(code: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "eps.bin").write_bytes(EPS)
    prelude = f"DATA = open({str(tmp_path / 'eps.bin')!r}, 'rb').read()\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_control_plain_pillow_would_run_gs(fake_gs, tmp_path):
    env, canary = fake_gs
    run_py("""
        import io
        from PIL import Image
        try:
            Image.open(io.BytesIO(DATA)).load()
        except Exception as e:
            print(type(e).__name__)
    """, env, tmp_path)
    assert canary.exists(), "the fake gs was not reached: this test would not detect Ghostscript"


def test_report_train_probe_and_adopt_decoders_never_run_gs(fake_gs, tmp_path):
    env, canary = fake_gs
    r = run_py("""
        from curate.imaging import ImageRejected, process_image, safe_decode_rgb, ImageOptions
        from curate.thumbs import thumbnail
        from curate.train_probe.data import decode_image
        from curate.stages.adopt import _describe
        assert thumbnail(DATA) is None
        assert _describe(DATA, "jpg").width is None  # adopt reads stored sizes through safe_open
        for call in (lambda: decode_image(DATA, 32), lambda: safe_decode_rgb(DATA),
                     lambda: process_image(DATA, ImageOptions())):
            try:
                call()
                raise SystemExit("decoded EPS")
            except ImageRejected as e:
                assert e.code == "format_not_allowed", e.code
        print("ok")
    """, env, tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    assert not canary.exists()


def test_score_decoder_never_runs_gs(fake_gs, tmp_path):
    env, canary = fake_gs
    r = run_py("""
        from curate.stages.score_loader import ImageSkipped, decode_image
        try:
            decode_image(DATA, lambda im: im, 32)
            raise SystemExit("decoded EPS")
        except ImageSkipped as e:
            print("skipped", e.code)
    """, env, tmp_path)
    assert r.returncode == 0 and "format_not_allowed" in r.stdout, (r.stdout, r.stderr)
    assert not canary.exists()


def test_download_of_eps_named_jpg_never_runs_gs(fake_gs, server, tmp_path):
    env, canary = fake_gs
    server.image("/photo.jpg", EPS, ctype="image/jpeg")
    server.image("/photo.ppm.jpg", b"P6\n4 4\n255\n" + b"\0" * 48, ctype="image/jpeg")
    inp = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [server.url("/photo.jpg"), server.url("/photo.ppm.jpg")]}), inp)
    out = tmp_path / "ds"
    r = subprocess.run([sys.executable, "-m", "curate.cli", "download", str(inp), "--out", str(out),
                        "--allow-host", server.endpoint, "--no-progress", "--image-size", "32"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = read_tables(DatasetDir.at(out).ledger_files()).to_pylist()
    assert [x["status"] for x in rows] == ["format_not_allowed", "format_not_allowed"]
    assert not canary.exists()
