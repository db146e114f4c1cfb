"""`curate report`: the HTML page's sections and figures, curation accuracy against ground truth, and a
real headless Chromium rendering it with no console errors (screenshot kept in artifacts/)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import tarfile
from collections import Counter
from html import unescape
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from loopback import jpeg
from PIL import Image
from pipeline_data import N_ROWS, SAME_BYTES, rows, write_ground_truth

from curate.cli import main
from curate.demo.ground_truth import curation_accuracy
from curate.errors import InputError, ShardError
from curate.io.layout import DatasetDir
from curate.io.shards import iter_raw
from curate.io.tables import write_table
from curate.report.report import ReportOptions, build_report
from curate.thumbs import image_members, load_thumbnails

SECTIONS = ("overview", "funnel", "histograms", "grids", "duplicates", "download-health", "train-probe",
            "ground-truth")
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
FUNNEL_ROW = r'<tr><td>(.*?)</td><td class="n">([\d,]+)</td>'


def make_probe_dir(path: Path) -> Path:
    """A train-probe output dir (results.json, results.md, a chart): written here, because a real
    `curate train-probe` trains CLIP models for minutes; the report only reads these files."""
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


def clauses_for(truth: list[dict]) -> list[tuple[str, object]]:
    """The export's clauses (SQL for curate, a predicate for the test), a clip_score cut the random tiny
    model's scores straddle."""
    scores = sorted(t["clip_score"] for t in truth if t["clip_score"] is not None)
    low = round(scores[len(scores) // 3], 3)
    return [(f"clip_score >= {low}", lambda t: t["clip_score"] is not None and t["clip_score"] >= low),
            ("lang = 'en'", lambda t: t["lang"] == "en"),
            ("NOT is_duplicate AND NOT eval_contaminated", lambda t: not t["is_duplicate"] and not t["eval_contaminated"])]


@pytest.fixture(scope="module")
def demo(pipeline_dataset, tmp_path_factory):
    """The real session dataset, a real `curate export` of it, its ground truth and a probe dir."""
    d = tmp_path_factory.mktemp("report")
    truth = rows(pipeline_dataset)
    clauses = clauses_for(truth)
    where = [a for c, _ in clauses for a in ("--where", c)]
    assert main(["export", str(pipeline_dataset), "--out", str(d / "export"), "--write-dropped", *where]) == 0
    left = [t for t in truth if t["status"] == "success"]
    funnel = [("input rows", N_ROWS), ("downloaded", len(left))]
    for c, ok in clauses:
        left = [t for t in left if ok(t)]
        funnel.append((c, len(left)))
    assert 0 < len(left) < funnel[-2][1] < funnel[1][1]  # every clause bites
    return {
        "ds": pipeline_dataset, "export": d / "export", "dir": d, "rows": truth, "clauses": clauses,
        "funnel": [*funnel, ("exported", len(left))], "kept": {t["key"] for t in left},
        "truth": write_ground_truth(d / "ground_truth.parquet"), "probe": make_probe_dir(d / "probe"),
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


def _funnel(html: str) -> list[tuple[str, int]]:
    return [(unescape(a), int(b.replace(",", ""))) for a, b in re.findall(FUNNEL_ROW, _section(html, "funnel"))]


def test_report_sections_funnel_and_health(demo, full_report):
    html = full_report.read_text()
    for sid in SECTIONS:
        _section(html, sid)
    # self-contained: no script, nothing fetched from anywhere
    assert "<script" not in html
    assert not re.search(r'(src|href)="(?!data:|#)', html)
    assert full_report.stat().st_size < 300_000

    assert _funnel(html) == demo["funnel"]
    failed = Counter(t["error_code"] for t in demo["rows"] if t["status"] != "success")
    funnel_text = _text(_section(html, "funnel"))
    assert f"−{sum(failed.values())} download failures:" in funnel_text
    assert all(f"{code} {n}" in funnel_text for code, n in failed.items())

    health = _text(_section(html, "download-health"))
    hosts = re.findall(r"<tr><td>([a-z0-9.()\s]+)</td><td class=\"n\">(\d+)</td><td class=\"n\">(\d+)</td>",
                       _section(html, "download-health"))
    # ports, paths and the scheme are stripped: the loopback server's rows and the ftp:// row share a host
    assert hosts == [("127.0.0.1", str(N_ROWS), str(sum(failed.values())))]
    assert "http_4xx" in health and "a 4xx answer" in health

    scored = sum(bool(t["scored"]) for t in demo["rows"])
    hist = _section(html, "histograms")
    kept = len(demo["kept"])
    assert f"kept ({kept})" in hist and f"dropped ({scored - kept})" in hist  # the scored rows split by the export


def _thumb_sizes(fragment: str) -> list[tuple[int, int]]:
    sizes = []
    for b64 in re.findall(r'src="data:image/jpeg;base64,([^"]+)"', fragment):
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            sizes.append(im.size)
    return sizes


def test_report_grids_and_duplicate_groups(demo, full_report):
    html = full_report.read_text()
    grids = _section(html, "grids")
    titles = re.findall(r"<h3>(.*?)</h3>", grids)
    assert titles == ["Highest clip_score (5)", "Lowest clip_score (5)", "Random kept (5)",
                      "Random dropped, with the reason (5)"]
    sizes = _thumb_sizes(grids)
    assert len(sizes) == 20 and all(w <= 112 and h <= 112 for w, h in sizes)
    highest = grids.split("<h3>")[1]
    scored = sorted((t for t in demo["rows"] if t["clip_score"] is not None), key=lambda t: (-t["clip_score"], t["key"]))
    assert re.findall(r"(\d{13}) · clip", highest) == [t["key"] for t in scored[:5]]
    dropped = grids.split("<h3>")[4]
    reasons = {unescape(r) for r in re.findall(r'<div class="why">(.*?)</div>', dropped)}
    assert len(re.findall('class="why"', dropped)) == 5 and reasons <= {c for c, _ in demo["clauses"]} | {"downloaded"}

    # duplicate groups as dedup wrote them: largest first, the kept sample first in its group
    members: dict[int, list[dict]] = {}
    for t in demo["rows"]:
        if t["dup_group"] is not None and t["dup_group"] >= 0:
            members.setdefault(t["dup_group"], []).append(t)
    order = sorted(members, key=lambda g: (-len(members[g]), g))
    assert len(order) >= len(set(SAME_BYTES.values()))  # the input's byte-equal copies were grouped
    dups = _section(html, "duplicates")
    groups = re.findall(r"<h3>group (\d+): (\d+) samples</h3>", dups)
    assert groups == [(str(g), str(len(members[g]))) for g in order]
    first = dups.split("<h3>")[1]
    group = members[order[0]]
    want = sorted(group, key=lambda t: (t["key"] != t["kept_key"], t["key"]))
    assert re.findall(r"(\d{13}) · clip", first) == [t["key"] for t in want]
    assert first.count('class="tile kept"') == 1 and len(_thumb_sizes(first)) == len(group)


def test_report_probe_and_ground_truth(full_report):
    html = full_report.read_text()
    probe = _section(html, "train-probe")
    assert "curated" in probe and "0.34" in probe and 'src="data:image/png;base64,' in probe
    gt = _text(_section(html, "ground-truth"))
    assert f"{N_ROWS} of {N_ROWS} ground-truth rows matched" in gt
    faults = sum(1 for c in pq_column(full_report.parent / "ground_truth.parquet", "expected_error_code") if c)
    # download caught every planted fault: precision, recall, tp, fp, fn, support, population
    assert re.search(rf"faults\s+100.0%\s+100.0%\s+{faults}\s+0\s+0\s+{faults}\s+{N_ROWS}", gt)


def pq_column(path: Path, name: str) -> list:
    return pq.read_table(path, columns=[name]).column(name).to_pylist()


def _confusion(pairs: list[tuple[bool, bool]]) -> tuple[int, int, int]:
    """(tp, fp, fn) of (predicted, true) pairs."""
    return (sum(p and t for p, t in pairs), sum(p and not t for p, t in pairs), sum(t and not p for p, t in pairs))


def test_curation_accuracy_exact(demo):
    acc = curation_accuracy(demo["ds"], demo["truth"], demo["export"])
    s = acc["steps"]
    assert acc["matched"] == N_ROWS
    truth = {r["SAMPLE_ID"]: r for r in pq.read_table(demo["truth"]).to_pylist()}
    rows_ = [dict(t, **{"gt_" + k: v for k, v in truth[t["SAMPLE_ID"]].items()}) for t in demo["rows"]]
    # faults: every planted fault failed, with the code it was planted for
    faults = _confusion([(t["status"] != "success", t["gt_expected_error_code"] is not None) for t in rows_])
    assert (s["faults"]["tp"], s["faults"]["fp"], s["faults"]["fn"]) == faults == (faults[0], 0, 0)
    assert s["faults"]["code_match"] == faults[0]
    # duplicates: over the deduplicated rows, a copy whose original was deduplicated too
    dd = [t for t in rows_ if t["is_duplicate"] is not None]
    in_dd = {t["SAMPLE_ID"] for t in dd}
    copy = {t["SAMPLE_ID"] for t in dd if t["gt_dup_of"] in in_dd}
    assert copy and (s["duplicates"]["tp"], s["duplicates"]["fp"], s["duplicates"]["fn"]) == \
        _confusion([(t["is_duplicate"], t["SAMPLE_ID"] in copy) for t in dd])
    grouped = copy | {t["gt_dup_of"] for t in dd if t["SAMPLE_ID"] in copy}
    assert (s["duplicate_groups"]["tp"], s["duplicate_groups"]["fn"]) == (len(grouped), 0)
    assert s["duplicate_groups"]["recall_by_kind"] == {"exact": 1.0}  # byte-equal copies: found by sha256
    # caption steps: scored rows dedup did not flag, dropped = not exported
    cap = [t for t in rows_ if t["scored"] and not t["is_duplicate"] and not t["eval_contaminated"]]
    for kind in ("boilerplate", "non_english"):
        pop = [t for t in cap if t["gt_caption_kind"] in ("clean", kind)]
        got = (s[kind]["tp"], s[kind]["fp"], s[kind]["fn"])
        assert got == _confusion([(t["key"] not in demo["kept"], t["gt_caption_kind"] == kind) for t in pop]), kind
    # the lang = 'en' clause drops every German and Spanish caption: the language ID found them all
    assert s["non_english"]["recall"] == 1.0 and s["non_english"]["tp"] >= 3
    noisy = _confusion([(t["key"] not in demo["kept"], t["gt_caption_kind"] != "clean") for t in cap])
    assert (s["noisy_captions"]["tp"], s["noisy_captions"]["fp"], s["noisy_captions"]["fn"]) == noisy
    # without an export, only the steps that need no kept set
    assert set(curation_accuracy(demo["ds"], demo["truth"])["steps"]) == {"faults", "duplicates", "duplicate_groups"}


def test_report_without_export_or_signals(demo, tmp_path):
    html = (build_report(demo["ds"], tmp_path / "r.html", options=ReportOptions(grid_size=4))).read_text()
    assert re.findall(r"<h3>(Random samples \(\d+\))</h3>", html) == ["Random samples (4)"]
    ok = [t for t in demo["rows"] if t["status"] == "success"]
    scored = [t for t in ok if t["scored"]]
    assert _funnel(html) == [("input rows", N_ROWS), ("downloaded", len(ok)), ("scored", len(scored)),
                             ("not a duplicate", sum(not t["is_duplicate"] for t in scored))]
    assert 'id="train-probe"' not in html and 'id="ground-truth"' not in html
    # a dataset with a ledger only (download done, nothing else) still renders every core section
    only = tmp_path / "only"
    shutil.copytree(demo["ds"] / "ledger", only / "ledger")
    shutil.copytree(demo["ds"] / "shards", only / "shards")
    shutil.copytree(demo["ds"] / "_done" / "download", only / "_done" / "download")
    html = build_report(only, tmp_path / "only.html").read_text()
    assert "no score signals" in html and "no dedup signals" in html
    assert len(_thumb_sizes(_section(html, "grids"))) == len(ok)


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
    raw = dict(iter_raw(tar))
    two = sorted(raw)[:2]
    found = image_members(tar, {*two, "0009999999999"})
    assert set(found) == set(two)
    assert all(found[k] == raw[k]["jpg"] for k in two)


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
    img = jpeg()
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


def test_report_of_an_export_dir_stands_for_its_source(demo, tmp_path):
    """The export dir given as DIR: the funnel and accuracy are those of its source with --export-dir."""
    html = build_report(demo["export"], tmp_path / "r.html").read_text()
    assert _funnel(html) == demo["funnel"]
    assert f"kept ({len(demo['kept'])})" in _section(html, "histograms")
    via_export = curation_accuracy(demo["export"], demo["truth"])
    assert via_export["steps"] == curation_accuracy(demo["ds"], demo["truth"], demo["export"])["steps"]


def test_two_probe_dirs_one_section_each_and_the_study_recommendation(demo, tmp_path):
    """--probe-dir is repeatable: a comparison and a --budgets study each get a section; the study's
    recommendation per budget and its figure are shown (the study object as quality_quantity writes it)."""
    from curate.train_probe.study import predicted_error, quality_quantity

    summary = []
    for f, b in zip((0.1, 0.3, 1.0), (-0.20, -0.17, -0.15), strict=True):
        for n in (2000, 8000, 32000, 128000):
            summary.append({"subset": f"top-{f}@{n}", "kind": "top" if f < 1 else "all", "fraction": f, "budget": n,
                            "subset_size": 20000 * f, "seeds": 3, "samples_seen": n, "epochs": n / (20000 * f),
                            "retrieval_r5_mean": 1 - predicted_error(n, 20000 * f, 1e-2, b, 2.0, 0.2),
                            "retrieval_r5_std": 0.01})
    study = quality_quantity(summary, "retrieval_r5")
    sdir = tmp_path / "study"
    sdir.mkdir()
    (sdir / "results.json").write_text(json.dumps({"summary": summary, "study": study, "comparisons": [],
                                                   "config": {"train": {"model": "curate-tiny", "samples_seen": 2000}}}))
    html = build_report(demo["ds"], tmp_path / "r.html", probe_dir=[demo["probe"], sdir]).read_text()
    assert "Train-probe: probe" in html and "Train-probe: study" in html
    text = _text(_section(html, "train-probe-2"))
    assert "Quality vs quantity" in text and "| 128000 | 1 |" in text and "| 2000 | 0.1 |" in text
    assert "95% CI" in text
    from curate.commands.report import one_screen_summary

    screen = one_screen_summary({}, str(demo["ds"]), None, (str(demo["probe"]), str(sdir)), None)
    assert "== train-probe (study) ==" in screen and "| 128000 | 1 |" in screen
