"""`curate report`: the HTML page's sections and figures, curation accuracy against ground truth, and a
real headless Chromium rendering it with no console errors (screenshot kept in artifacts/)."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import tarfile
from html import unescape
from pathlib import Path

import pyarrow as pa
import pytest
import report_fixtures as F
from PIL import Image

from curate.cli import main
from curate.errors import InputError, ShardError
from curate.io.layout import DatasetDir
from curate.io.tables import write_table
from curate.report.ground_truth import curation_accuracy
from curate.report.report import ReportOptions, build_report
from curate.report.thumbs import image_members, load_thumbnails

SECTIONS = ("overview", "funnel", "histograms", "grids", "duplicates", "download-health", "train-probe",
            "ground-truth")
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    return {
        "ds": F.make_report_dataset(d / "ds"),
        "export": F.make_export(d / "ds", d / "export"),
        "truth": F.make_ground_truth(d / "ground_truth.parquet"),
        "probe": F.make_probe_dir(d / "probe"),
        "dir": d,
    }


@pytest.fixture(scope="module")
def full_report(demo) -> Path:
    out = demo["dir"] / "report.html"
    rc = main(["report", str(demo["ds"]), "--out", str(out), "--export-dir", str(demo["export"]),
               "--probe-dir", str(demo["probe"]), "--ground-truth", str(demo["truth"]), "--grid-size", "5"])
    assert rc == 0
    return out


def _section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', html, re.S)
    assert m, f"section {sid} missing"
    return m.group(1)


def _text(fragment: str) -> str:
    return unescape(re.sub(r"<[^>]+>", " ", fragment))


def test_report_sections_funnel_and_health(full_report):
    html = full_report.read_text()
    for sid in SECTIONS:
        _section(html, sid)
    # self-contained: no script, nothing fetched from anywhere
    assert "<script" not in html
    assert not re.search(r'(src|href)="(?!data:|#)', html)
    assert full_report.stat().st_size < 300_000

    funnel = re.findall(r'<tr><td>(.*?)</td><td class="n">([\d,]+)</td>', _section(html, "funnel"))
    assert [(unescape(a), int(b)) for a, b in funnel] == [
        ("input rows", 24), ("downloaded", 19), ("clip_score >= 0.1", 15), ("lang = 'en'", 12),
        ("NOT is_duplicate AND NOT eval_contaminated", 8), ("exported", 8)]
    assert "−5 download failures: http_4xx 2" in _text(_section(html, "funnel"))

    health = _text(_section(html, "download-health"))
    hosts = re.findall(r"<tr><td>([a-z.()\s]+)</td><td class=\"n\">(\d+)</td><td class=\"n\">(\d+)</td>",
                       _section(html, "download-health"))
    # ports, paths and the query are stripped; the ftp row still has a host
    assert hosts == [("bad.example.org", "3", "3"), ("files.example.com", "1", "1"), ("slow.example.net", "1", "1")]
    assert "http_4xx" in health and "a 4xx answer" in health

    hist = _section(html, "histograms")
    assert "kept (8)" in hist and "dropped (10)" in hist  # 18 scored split by the export


def _thumb_sizes(fragment: str) -> list[tuple[int, int]]:
    sizes = []
    for b64 in re.findall(r'src="data:image/jpeg;base64,([^"]+)"', fragment):
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            sizes.append(im.size)
    return sizes


def test_report_grids_and_duplicate_groups(full_report):
    html = full_report.read_text()
    grids = _section(html, "grids")
    titles = re.findall(r"<h3>(.*?)</h3>", grids)
    assert titles == ["Highest clip_score (5)", "Lowest clip_score (5)", "Random kept (5)",
                      "Random dropped, with the reason (5)"]
    sizes = _thumb_sizes(grids)
    assert len(sizes) == 20 and all(w <= 112 and h <= 112 for w, h in sizes)
    highest = grids.split("<h3>")[1]
    assert re.findall(r"(\d{13}) · clip", highest) == [F.key_of(r) for r in (20, 19, 18, 17, 16)]
    dropped = grids.split("<h3>")[4]
    reasons = {unescape(r) for r in re.findall(r'<div class="why">(.*?)</div>', dropped)}
    assert len(re.findall('class="why"', dropped)) == 5 and reasons <= {c for c, _ in F.CLAUSES}

    dups = _section(html, "duplicates")
    groups = re.findall(r"<h3>group (\d+): (\d+) samples</h3>", dups)
    assert groups == [("7", "3"), ("9", "2")]
    first = dups.split("<h3>")[1]
    assert re.findall(r"(\d{13}) · clip", first) == [F.key_of(0), F.key_of(12), F.key_of(13)]
    assert first.count('class="tile kept"') == 1 and len(_thumb_sizes(first)) == 3


def test_report_probe_and_ground_truth(full_report):
    html = full_report.read_text()
    probe = _section(html, "train-probe")
    assert "curated" in probe and "0.34" in probe and 'src="data:image/png;base64,' in probe
    gt = _text(_section(html, "ground-truth"))
    assert "24 of 24 ground-truth rows matched" in gt
    assert re.search(r"faults\s+100.0%\s+83.3%\s+5\s+0\s+1\s+6\s+24", gt)


def test_curation_accuracy_exact(demo):
    acc = curation_accuracy(demo["ds"], demo["truth"], demo["export"])
    s = acc["steps"]
    assert acc["matched"] == 24
    # download caught 5 of the 6 planted faults (row 21's truncated bytes slipped through to score)
    assert (s["faults"]["tp"], s["faults"]["fp"], s["faults"]["fn"]) == (5, 0, 1)
    assert s["faults"]["code_match"] == 5
    # dedup flagged 12, 13 and 5; the re-encoded copy 16 was missed
    assert (s["duplicates"]["tp"], s["duplicates"]["fp"], s["duplicates"]["fn"]) == (3, 0, 1)
    assert s["duplicate_groups"]["recall_by_kind"] == {"cropped": 1.0, "exact": 1.0, "reencoded": 0.0,
                                                       "resized": 1.0}
    # population: scored and not flagged by dedup = 0-4, 6, 8, 14-20; dropped: 0-3, 14, 15
    assert (s["misaligned"]["tp"], s["misaligned"]["fp"], s["misaligned"]["fn"]) == (2, 1, 1)
    assert (s["boilerplate"]["tp"], s["boilerplate"]["fp"], s["boilerplate"]["fn"]) == (0, 1, 2)
    assert s["non_english"]["precision"] == 0.75 and s["non_english"]["recall"] == 1.0
    assert (s["noisy_captions"]["tp"], s["noisy_captions"]["fp"], s["noisy_captions"]["fn"]) == (5, 1, 3)
    # without an export, only the steps that need no kept set
    assert set(curation_accuracy(demo["ds"], demo["truth"])["steps"]) == {"faults", "duplicates", "duplicate_groups"}


def test_report_without_export_or_signals(demo, tmp_path):
    html = (build_report(demo["ds"], tmp_path / "r.html", options=ReportOptions(grid_size=4))).read_text()
    assert re.findall(r"<h3>(Random samples \(\d+\))</h3>", html) == ["Random samples (4)"]
    funnel = [(unescape(a), int(b)) for a, b in
              re.findall(r'<tr><td>(.*?)</td><td class="n">([\d,]+)</td>', _section(html, "funnel"))]
    assert funnel == [("input rows", 24), ("downloaded", 19), ("scored", 18), ("not a duplicate", 15)]
    assert 'id="train-probe"' not in html and 'id="ground-truth"' not in html
    # a dataset with a ledger only (download done, nothing else) still renders every core section
    only = tmp_path / "only"
    shutil.copytree(demo["ds"] / "ledger", only / "ledger")
    shutil.copytree(demo["ds"] / "shards", only / "shards")
    shutil.copytree(demo["ds"] / "_done" / "download", only / "_done" / "download")
    html = build_report(only, tmp_path / "only.html").read_text()
    assert "no score signals" in html and "no dedup signals" in html
    assert len(_thumb_sizes(_section(html, "grids"))) == 19


def test_report_input_errors(demo, tmp_path):
    with pytest.raises(InputError, match="--probe-dir"):
        build_report(demo["ds"], tmp_path / "r.html", probe_dir=tmp_path / "nope")
    bad = tmp_path / "truth.parquet"
    write_table(bad, pa.table({"SAMPLE_ID": ["s000"], "dup_of": [None]}))
    with pytest.raises(InputError, match="expected_error_code, caption_kind"):
        curation_accuracy(demo["ds"], bad)
    with pytest.raises(InputError, match="--export-dir"):
        build_report(demo["ds"], tmp_path / "r.html", export_dir=tmp_path / "nope")
    assert main(["report", str(demo["ds"]), "--out", str(tmp_path / "r.html"), "--ground-truth", str(bad)]) == 2
    assert not (tmp_path / "r.html").exists()


def test_image_members_reads_only_requested(demo):
    tar = demo["ds"] / "shards" / "00000001.tar"
    wanted = {F.key_of(13), F.key_of(20), "0009999999999"}
    found = image_members(tar, wanted)
    assert set(found) == {F.key_of(13), F.key_of(20)}
    assert found[F.key_of(13)] == F.jpeg(13)


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium (/usr/bin/chromium) is not installed: "
                    "apt-get install chromium")
def test_report_renders_in_headless_chromium(full_report, tmp_path):
    url = full_report.resolve().as_uri()
    dom = _chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for sid in SECTIONS:
        assert f'id="{sid}"' in dom.stdout, f"section {sid} not in the rendered DOM"
    assert dom.stdout.count("<img") >= 20
    shot = tmp_path / "report.png"
    run = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", url)
    assert run.returncode == 0, run.stderr[-2000:]
    assert _console_errors(dom.stderr) == [] and _console_errors(run.stderr) == []
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        colors = im.convert("RGB").resize((64, 100)).getcolors(64 * 100)
        assert colors is not None and len(colors) > 50  # a page with content, not a blank frame
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "report-screenshot.png")
    # the detector itself: a page with a script error is caught the same way
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    assert _console_errors(_chromium(tmp_path, "--dump-dom", bad.as_uri()).stderr)


def _tar(path: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_image_members_fallback_truncation_and_unsafe_names(tmp_path):
    img = F.jpeg(3)
    # a pax archive (long names, as other writers make) goes through tarfile and gives the same bytes
    pax = _tar(tmp_path / "pax.tar", [("d" * 120 + "/0000000000001.txt", b"cap"), ("x/0000000000001.jpg", img)],
               tarfile.PAX_FORMAT)
    assert image_members(pax, {"0000000000001"}) == {"0000000000001": img}
    full = _tar(tmp_path / "full.tar", [("0000000000001.txt", b"cap"), ("0000000000001.jpg", img)])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full.read_bytes()[: 512 * 3 + len(img) // 2])
    with pytest.raises(ShardError, match="truncated"):
        image_members(cut, {"0000000000001"})
    unsafe = _tar(tmp_path / "unsafe.tar", [("../0000000000001.jpg", img)])
    with pytest.raises(ShardError, match="unsafe name"):
        image_members(unsafe, {"0000000000001"})
    # the report skips a broken shard instead of failing
    ds = DatasetDir.at(tmp_path / "ds")
    ds.shard_tar("00000000").parent.mkdir(parents=True)
    shutil.copy(cut, ds.shard_tar("00000000"))
    assert load_thumbnails(ds, [("0000000000001", "00000000")]) == {}


def test_report_over_a_real_curate_export(demo, tmp_path, capsys):
    """`curate export --write-dropped` on the fixture gives the funnel and accuracy the fixture describes,
    and the export dir given as DIR stands for its source."""
    out = tmp_path / "export"
    where = [a for c, _ in F.CLAUSES[1:] for a in ("--where", c)]
    assert main(["export", str(demo["ds"]), "--out", str(out), "--write-dropped", *where]) == 0
    html = build_report(out, tmp_path / "r.html").read_text()
    funnel = [(unescape(a), int(b)) for a, b in
              re.findall(r'<tr><td>(.*?)</td><td class="n">([\d,]+)</td>', _section(html, "funnel"))]
    assert funnel == [("input rows", 24), ("downloaded", 19), ("clip_score >= 0.1", 15), ("lang = 'en'", 12),
                      ("NOT is_duplicate AND NOT eval_contaminated", 8), ("exported", 8)]
    assert "kept (8)" in _section(html, "histograms")
    real = curation_accuracy(out, demo["truth"])
    assert real["steps"] == curation_accuracy(demo["ds"], demo["truth"], demo["export"])["steps"]
