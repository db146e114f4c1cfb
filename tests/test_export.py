"""curate export: selection by clauses in order, original bytes resharded, lineage, dry run, resume, errors."""

from __future__ import annotations

import hashlib
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import copy_dataset, crash_env
from pipeline_data import N_ROWS, rows

from curate.cli import main
from curate.io.atomic import read_json
from curate.io.layout import DatasetDir, shard_name, shard_of_key
from curate.io.shards import iter_raw


def f32(v: float) -> float:
    return float(np.float32(v))


def expected(rows, *checks):
    """Apply (name, predicate) in order; returns kept keys and {key: first failing clause}."""
    kept, dropped = [], {}
    for t in rows:
        for name, ok in (("downloaded", lambda t: t["status"] == "success"), *checks):
            if not ok(t):
                dropped[t["key"]] = name
                break
        else:
            kept.append(t["key"])
    return kept, dropped


def raw_members(root):
    out = {}
    for tar in sorted((root / "shards").glob("*.tar")):
        for key, members in iter_raw(tar):
            assert key not in out, f"{key} appears twice"
            out[key] = members
    return out


@pytest.fixture(scope="module")
def source(pipeline_dataset):
    """Downloaded, scored and deduplicated by the real stages (conftest.py); read-only."""
    return pipeline_dataset


@pytest.fixture(scope="module")
def truth(source):
    """Every ledger row with the signals score and dedup wrote for it."""
    return rows(source)


def median_score(truth) -> float:
    """A threshold that splits the scored rows (the tiny random model's scores sit anywhere in [-1, 1])."""
    return round(float(np.median([t["clip_score"] for t in truth if t["clip_score"] is not None])), 3)


def test_export_keeps_the_right_samples_with_original_bytes_and_lineage(source, truth, tmp_path):
    out = tmp_path / "out"
    low = round(median_score(truth) - 0.05, 3)
    clause = f"clip_score >= {low}"
    rc = main(["export", str(source), "--out", str(out), "--where", clause,
               "--where", "lang = 'en'", "--samples-per-shard", "4", "--write-dropped"])
    assert rc == 0
    kept, dropped = expected(truth, (clause, lambda t: t["clip_score"] is not None
                                     and f32(t["clip_score"]) >= low),
                             ("lang = 'en'", lambda t: t["lang"] == "en"))
    assert 4 < len(kept) < 20 and set(dropped.values()) == {"downloaded", clause, "lang = 'en'"}  # all bite

    # shards: sorted keys, 4 per shard, image and caption bytes identical to the source's; the json is the
    # source's with a uid (32 hex digits of SHA-256 over URL and caption, DataComp's tools match it)
    src = raw_members(source)
    got = raw_members(out)
    assert sorted(got) == kept
    by_key = {t["key"]: t for t in truth}
    for k in kept:
        assert {e: b for e, b in got[k].items() if e != "json"} == {e: b for e, b in src[k].items() if e != "json"}
        meta = json.loads(got[k]["json"])
        row = by_key[k]
        uid = hashlib.sha256(f"{row['url']}\n{row['caption']}".encode()).hexdigest()[:32]
        assert meta == {**json.loads(src[k]["json"]), "uid": uid}
    tars = sorted((out / "shards").glob("*.tar"))
    assert [t.stem for t in tars] == [shard_name(i) for i in range((len(kept) + 3) // 4)]
    # what training code reads beside the tars: open_clip's and DataComp's shard table, DataComp's stats
    sizes = read_json(out / "shards" / "sizes.json")
    assert sizes == {t.name: len({n.split(".")[0] for n in tarfile.open(t).getnames()}) for t in tars}
    assert sum(sizes.values()) == len(kept)
    for t in tars:
        assert read_json(t.with_name(f"{t.stem}_stats.json")) == {"count": sizes[t.name], "successes": sizes[t.name]}
    first = [n.split(".")[0] for n in tarfile.open(tars[0]).getnames()]
    assert sorted(set(first)) == kept[:4]

    # ledger: kept rows with their signals, output shard and source lineage
    led = pq.read_table(out / "ledger").to_pylist()
    assert [r["key"] for r in led] == kept
    for r in led:
        assert r["source_key"] == r["key"] and r["source_shard"] == shard_of_key(r["key"])
        assert r["clip_score"] == pytest.approx(by_key[r["key"]]["clip_score"], abs=1e-6)
        assert r["status"] == "success" and r["is_duplicate"] == by_key[r["key"]]["is_duplicate"]
    assert {r["shard"] for r in led} == {t.stem for t in tars}

    # dropped.parquet: every other row, with the first clause that dropped it
    d = pq.read_table(out / "dropped.parquet").to_pylist()
    assert {r["key"]: r["clause"] for r in d} == dropped

    man = read_json(out / "manifest.json")["stages"]["export"]
    assert man["status"] == "complete"
    assert man["inputs"]["source"] == str(source)
    stages = read_json(source / "manifest.json")["stages"]
    assert man["inputs"]["source_stages"] == {s: stages[s]["fingerprint"] for s in ("dedup", "download", "score")}
    counts = man["counts"]
    assert counts["input"] == N_ROWS and counts["kept"] == len(kept)
    assert [c["clause"] for c in counts["clauses"]] == ["downloaded", clause, "lang = 'en'"]
    assert [c["removed"] for c in counts["clauses"]] == [
        sum(1 for v in dropped.values() if v == c) for c in ("downloaded", clause, "lang = 'en'")]


def test_dry_run_prints_counts_per_clause_and_writes_nothing(source, truth, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["export", str(source), "--out", str(out), "--policy", "dedup", "--top-fraction", "0.5",
               "--by", "clip_score", "--dry-run"])
    assert rc == 0
    assert not out.exists()
    lines = {ln.split()[0]: ln.split()[1:] for ln in capsys.readouterr().out.splitlines()[1:]}
    ok = [t for t in truth if t["status"] == "success"]
    not_dup = [t for t in ok if not t["is_duplicate"]]
    clean = [t for t in not_dup if not t["eval_contaminated"]]
    assert 0 < len(clean) < len(not_dup) < len(ok) < N_ROWS  # every clause bites
    assert lines["input"] == [str(N_ROWS)]
    assert lines["downloaded"] == [str(N_ROWS - len(ok)), str(len(ok))]
    assert lines["dedup:not_duplicate"] == [str(len(ok) - len(not_dup)), str(len(not_dup))]
    assert lines["dedup:not_eval_contaminated"] == [str(len(not_dup) - len(clean)), str(len(clean))]
    top = int(np.floor(0.5 * sum(t["clip_score"] is not None for t in clean) + 0.5))  # removed, then remaining
    assert lines["top"] == ["0.5", "by", "clip_score", str(len(clean) - top), str(top)]
    assert lines["kept"] == [str(top)]


def test_top_fraction_ranks_the_rows_left_with_ties_to_the_lower_key(source, truth, tmp_path):
    out = tmp_path / "out"
    assert main(["export", str(source), "--out", str(out), "--top-fraction", "0.3", "--by", "clip_score"]) == 0
    scored = [t for t in truth if t["clip_score"] is not None]
    k = int(np.floor(0.3 * len(scored) + 0.5))
    best = sorted(scored, key=lambda t: (-f32(t["clip_score"]), t["key"]))[:k]
    assert [r["key"] for r in pq.read_table(out / "ledger").to_pylist()] == sorted(t["key"] for t in best)


def test_missing_stage_column_is_an_input_error_naming_column_and_stage(source, tmp_path, capsys):
    src = copy_dataset(source, tmp_path / "src")
    DatasetDir.at(src).discard("dedup")
    rc = main(["export", str(src), "--out", str(tmp_path / "out"), "--policy", "dedup"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "is_duplicate" in err and "stage 'dedup'" in err
    assert main(["export", str(src), "--out", str(tmp_path / "out"), "--where", "no_such_col > 1"]) == 2
    assert "unknown column 'no_such_col'" in capsys.readouterr().err
    assert main(["export", str(src), "--out", str(tmp_path / "out"), "--where", "clip_score >>> 1"]) == 2
    assert main(["export", str(src), "--out", str(tmp_path / "out"), "--top-fraction", "1.5",
                 "--by", "clip_score"]) == 2
    assert not (tmp_path / "out" / "shards").exists()


def test_rerun_resumes_refuses_another_policy_and_redo_replaces(source, truth, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["export", str(source), "--out", str(out), "--policy", "dedup", "--samples-per-shard", "5"]
    assert main(args) == 0
    tar = out / "shards" / "00000000.tar"
    before = tar.stat().st_mtime_ns
    # a shard lost its marker (killed before the marker): only that shard is redone
    (out / "_done" / "export" / "00000001.json").unlink()
    capsys.readouterr()
    assert main(args) == 0
    assert "1 shard(s) done" in capsys.readouterr().err
    assert tar.stat().st_mtime_ns == before
    assert main([*args[:-2], "--samples-per-shard", "5", "--where", "lang = 'en'"]) == 2
    assert "fingerprint" in capsys.readouterr().err
    assert main([*args, "--where", "lang = 'en'", "--redo"]) == 0
    keys = [r["key"] for r in pq.read_table(out / "ledger").to_pylist()]
    kept, _ = expected(truth, ("dedup:not_duplicate", lambda t: not t["is_duplicate"]),
                       ("dedup:not_eval_contaminated", lambda t: not t["eval_contaminated"]),
                       ("lang = 'en'", lambda t: t["lang"] == "en"))
    assert keys == kept


def test_export_of_an_export_and_empty_selection(source, truth, tmp_path):
    first = tmp_path / "first"
    assert main(["export", str(source), "--out", str(first), "--policy", "dedup"]) == 0
    second = tmp_path / "second"
    # the export's ledger carries the signals, so it can be filtered again without score/dedup dirs
    assert main(["export", str(first), "--out", str(second), "--where", "lang NOT IN ('en', 'und')"]) == 0
    keys = [r["key"] for r in pq.read_table(second / "ledger").to_pylist()]
    want, _ = expected(truth, ("dedup", lambda t: not t["is_duplicate"] and not t["eval_contaminated"]),
                       ("foreign", lambda t: t["lang"] not in ("en", "und")))
    assert keys == want and len(want) >= 3  # the German and Spanish captions
    # an export of an export copies the first export's members, uid included, byte for byte
    assert raw_members(second) == {k: v for k, v in raw_members(first).items() if k in keys}
    empty = tmp_path / "empty"
    assert main(["export", str(source), "--out", str(empty), "--where", "FALSE"]) == 0
    assert read_json(empty / "manifest.json")["stages"]["export"]["counts"]["kept"] == 0


def test_export_to_an_fsspec_url_publishes_every_shard_marker_last(source, tmp_path):
    import fsspec

    args = ["export", str(source), "--policy", "dedup", "--samples-per-shard", "4"]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    url = "memory://curate-test/exported"
    assert main([*args, "--out", url, "--staging", str(tmp_path / "staging")]) == 0
    fs = fsspec.filesystem("memory")
    local = sorted(p.name for p in (tmp_path / "local" / "shards").glob("*.tar"))
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.glob("/curate-test/exported/shards/*.tar")) == local
    for name in ("sizes.json", *(n.replace(".tar", "_stats.json") for n in local)):
        with fs.open(f"/curate-test/exported/shards/{name}", "rb") as f:
            assert f.read() == (tmp_path / "local" / "shards" / name).read_bytes(), name
    for name in local:  # byte-identical to a local export, and each published shard has its marker
        assert fs.cat(f"/curate-test/exported/shards/{name}") == (tmp_path / "local" / "shards" / name).read_bytes()
        assert fs.exists(f"/curate-test/exported/_done/export/{name[:-4]}.json")
    assert fs.exists("/curate-test/exported/manifest.json")
    # a rerun resumes from the staging dir (every shard already done) and republishes what is missing
    fs.rm("/curate-test/exported/manifest.json")
    assert main([*args, "--out", url, "--staging", str(tmp_path / "staging")]) == 0
    assert fs.exists("/curate-test/exported/manifest.json")
    fs.rm("/curate-test", recursive=True)


def _outputs(root):
    tars = {t.name: t.read_bytes() for t in sorted((root / "shards").glob("*.tar"))}
    return tars, pq.read_table(root / "ledger").to_pylist()


def test_a_killed_export_task_then_a_rerun_equals_a_clean_run(source, tmp_path):
    """A real CLI process dies (os._exit, from the test-only hook in tests/crash_hook) after its first tar
    is in place and before its ledger; the rerun redoes that shard and the result equals a clean run."""
    import subprocess
    import sys

    args = ["--policy", "dedup", "--top-fraction", "0.7", "--by", "clip_score", "--samples-per-shard", "4"]
    assert main(["export", str(source), "--out", str(tmp_path / "clean"), *args]) == 0
    out = tmp_path / "killed"
    env = crash_env(CURATE_TEST_CRASH_ONCE=str(tmp_path / "flags"))
    proc = subprocess.run([sys.executable, "-m", "curate.cli", "export", str(source), "--out", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr[-2000:]
    crashed = (tmp_path / "flags" / "export-crashed").read_text().strip()
    assert (out / "shards" / f"{crashed}.tar").exists()
    assert not (out / "ledger" / f"{crashed}.parquet").exists()
    assert not (out / "_done" / "export" / f"{crashed}.json").exists()
    assert main(["export", str(source), "--out", str(out), *args]) == 0
    assert _outputs(out) == _outputs(tmp_path / "clean")


@pytest.mark.spark
def test_local_one_and_two_workers_and_spark_local_give_identical_bytes(source, tmp_path):
    import os

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    args = ["--policy", "datacomp-basic", "--where", "NOT is_duplicate", "--top-fraction", "0.6", "--by",
            "clip_score", "--samples-per-shard", "3", "--write-dropped"]
    runs = {"one": [], "two": ["--workers", "2"], "spark": ["--engine", "spark", "--spark-master", "local[2]"]}
    for name, extra in runs.items():
        assert main(["export", str(source), "--out", str(tmp_path / name), *args, *extra]) == 0, name
    one = _outputs(tmp_path / "one")
    assert len(one[0]) >= 2 and one[1]
    dropped = pq.read_table(tmp_path / "one" / "dropped.parquet")
    for name in ("two", "spark"):
        assert _outputs(tmp_path / name) == one, name
        assert pq.read_table(tmp_path / name / "dropped.parquet").equals(dropped), name
        assert read_json(tmp_path / name / "manifest.json")["stages"]["export"]["counts"] == \
            read_json(tmp_path / "one" / "manifest.json")["stages"]["export"]["counts"]


def test_every_signal_table_joins_the_view_other_scorers_prefixed(source, truth, tmp_path):
    """A second scorer's table (signals/dfn/) joins `samples` as dfn_<column>; score and dedup stay unprefixed."""
    import pyarrow as pa

    from curate.io.atomic import write_json
    from curate.io.tables import write_table

    src = DatasetDir.at(copy_dataset(source, tmp_path / "src"))
    for shard in src.done_shards("score"):
        score = pq.read_table(src.signals("score", shard))
        # the second scorer ranks in the opposite order: 1 - clip_score
        other = pa.table({"key": score["key"], "clip_score": pa.compute.subtract(pa.scalar(1.0, pa.float32()),
                                                                                 score["clip_score"])})
        write_table(src.signals("dfn", shard), other)
        write_json(src.marker("dfn", shard), {"shard": shard, "stats": {}})
    out = tmp_path / "out"
    high = round(1 - median_score(truth), 3)  # keeps the rows whose clip_score is under the median
    assert main(["export", str(src.root), "--out", str(out), "--where", "dfn_clip_score > 1 - clip_score - 1e-6",
                 "--where", f"dfn_clip_score >= {high}", "--write-dropped"]) == 0
    led = pq.read_table(out / "ledger").to_pylist()
    want = [t["key"] for t in truth if t["status"] == "success" and t["clip_score"] is not None
            and 1 - f32(t["clip_score"]) >= high - 1e-6]
    assert [r["key"] for r in led] == want and want
    assert all(r["dfn_clip_score"] == pytest.approx(1 - r["clip_score"], abs=1e-6) for r in led)
    # top fraction by the second scorer: the lowest clip_score rows
    top = tmp_path / "top"
    assert main(["export", str(src.root), "--out", str(top), "--top-fraction", "0.25", "--by", "dfn_clip_score"]) == 0
    scored = sorted((t for t in truth if t["clip_score"] is not None), key=lambda t: (f32(t["clip_score"]), t["key"]))
    k = int(np.floor(0.25 * len(scored) + 0.5))
    assert [r["key"] for r in pq.read_table(top / "ledger").to_pylist()] == sorted(t["key"] for t in scored[:k])


def test_img2dataset_layout_reads_back_with_webdataset_and_img2dataset_conventions(source, truth, tmp_path):
    import json

    import webdataset as wds

    out = tmp_path / "i2d"
    assert main(["export", str(source), "--out", str(out), "--policy", "dedup", "--samples-per-shard", "5",
                 "--layout", "img2dataset"]) == 0
    kept, _ = expected(truth, ("dedup:not_duplicate", lambda t: not t["is_duplicate"]),
                       ("dedup:not_eval_contaminated", lambda t: not t["eval_contaminated"]))
    tars = sorted(out.glob("*.tar"))
    assert [t.stem for t in tars] == [shard_name(i) for i in range((len(kept) + 4) // 5)]
    assert not (out / "shards").exists() and not (out / "ledger").exists()
    src = raw_members(source)
    by_key = {t["key"]: t for t in truth}
    # webdataset reads every sample: the image bytes are the source's, the caption and json img2dataset's
    seen = []
    for sample in wds.WebDataset([str(t) for t in tars], shardshuffle=False):
        key = sample["__key__"]
        seen.append(key)
        assert sample["jpg"] == src[key]["jpg"]
        assert sample["txt"].decode() == by_key[key]["caption"]
        meta = json.loads(sample["json"])
        assert meta["key"] == key and meta["status"] == "success" and meta["url"].startswith("http://127.0.0.1:")
        assert set(meta) >= {"url", "caption", "key", "status", "error_message", "width", "height",
                             "original_width", "original_height", "exif", "sha256", "uid"}
        assert meta["uid"] == hashlib.sha256(f"{meta['url']}\n{meta['caption']}".encode()).hexdigest()[:32]
    assert seen == kept
    sizes = read_json(out / "sizes.json")  # open_clip's shard table, flat beside the tars here
    assert sizes == {t.name: len(list(iter_raw(t))) for t in tars} and sum(sizes.values()) == len(kept)
    # img2dataset's conventions: {shard}.parquet lists the shard's rows, {shard}_stats.json counts them
    for tar in tars:
        table = pq.read_table(out / f"{tar.stem}.parquet")
        assert table.column_names[:11] == ["url", "caption", "key", "status", "error_message", "width", "height",
                                           "original_width", "original_height", "exif", "sha256"]
        assert "clip_score" in table.column_names  # curate's signals ride along as extra columns
        keys = table["key"].to_pylist()
        assert keys == [k for k, _ in iter_raw(tar)]
        stats = read_json(out / f"{tar.stem}_stats.json")
        assert stats["count"] == stats["successes"] == len(keys) and stats["status_dict"] == {"success": len(keys)}
    # an img2dataset folder is what `curate adopt` reads: the export round-trips
    back = tmp_path / "adopted"
    assert main(["adopt", str(out), "--out", str(back)]) == 0
    assert raw_members(back) == {k: {"jpg": src[k]["jpg"], **{e: v for e, v in raw_members(back)[k].items()
                                                             if e != "jpg"}} for k in kept}
    assert [r["key"] for r in pq.read_table(back / "ledger").to_pylist()] == kept


def test_dropped_list_has_one_schema(source, tmp_path):
    assert main(["export", str(source), "--out", str(tmp_path / "o"), "--policy", "dedup", "--write-dropped"]) == 0
    schema = pq.read_schema(tmp_path / "o" / "dropped.parquet")
    assert [(f.name, str(f.type), f.nullable) for f in schema] == [
        ("key", "string", True), ("source_shard", "string", True), ("clause", "string", True)]


def test_a_stage_run_later_on_the_source_refuses_only_the_exports_that_read_it(source, tmp_path, capsys):
    """`make demo` balances the pool after the curated export: rerunning the pipeline must resume that
    export, while an export that reads balance_rank must see a rebalanced source as a change."""
    src = copy_dataset(source, tmp_path / "src")
    meta = tmp_path / "metadata.txt"
    meta.write_text("cat\ndog\nphoto\npicture\nred\n")
    plain = ["export", str(src), "--out", str(tmp_path / "plain"), "--policy", "dedup"]
    assert main(plain) == 0
    assert main(["balance", str(src), "--metadata", str(meta), "--seed", "7", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(plain) == 0  # balance is not read: resumes
    assert "fingerprint" not in capsys.readouterr().err
    balanced = ["export", str(src), "--out", str(tmp_path / "balanced"), "--where", "balance_rank < 2"]
    assert main(balanced) == 0
    assert main(["balance", str(src), "--metadata", str(meta), "--seed", "8", "--redo", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(balanced) == 2  # it reads balance_rank, whose stage changed
    assert "fingerprint" in capsys.readouterr().err
    assert main(plain) == 0


def test_array_indices_started_together_compute_the_selection_once(source, tmp_path, monkeypatch):
    """Two Slurm array indices entering the plan at once: one runs the selection query, the other waits for it and
    reads the same folder (the query itself runs unchanged; the wrapper only counts the calls)."""
    import threading
    import time

    from curate.io.layout import DatasetDir
    from curate.stages import export as ex

    calls = []
    real = ex.select

    def counted(cfg, folder=None):
        calls.append(folder)
        time.sleep(0.5)  # keep the first index inside while the second arrives
        return real(cfg, folder)

    monkeypatch.setattr(ex, "select", counted)
    ds = DatasetDir.at(tmp_path / "o")
    out = [None, None]

    def index(i: int) -> None:
        cfg = ex.ExportConfig(source=str(source), policy=("dedup",))
        out[i] = ex.ensure_selection(cfg, ds)

    threads = [threading.Thread(target=index, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and out[0] == out[1] and out[0][1]["kept"] > 0
