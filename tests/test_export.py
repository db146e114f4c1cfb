"""curate export: selection by clauses in order, original bytes resharded, lineage, dry run, resume, errors."""

from __future__ import annotations

import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from export_fixtures import key_of, make_export_source, truth

from curate.cli import main
from curate.io.atomic import read_json
from curate.io.layout import shard_name, shard_of_key
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
def source(tmp_path_factory):
    return make_export_source(tmp_path_factory.mktemp("src") / "ds").root


def test_export_keeps_the_right_samples_with_original_bytes_and_lineage(source, tmp_path):
    out = tmp_path / "out"
    rc = main(["export", str(source), "--out", str(out), "--where", "clip_score >= 0.25",
               "--where", "lang = 'en'", "--samples-per-shard", "4", "--write-dropped"])
    assert rc == 0
    kept, dropped = expected(truth(), ("clip_score >= 0.25", lambda t: t["clip_score"] is not None
                                       and f32(t["clip_score"]) >= 0.25),
                             ("lang = 'en'", lambda t: t["lang"] == "en"))
    assert 4 < len(kept) < 20  # the fixture makes both clauses bite

    # shards: sorted keys, 4 per shard, member bytes identical to the source's
    src = raw_members(source)
    got = raw_members(out)
    assert sorted(got) == kept
    assert all(got[k] == src[k] for k in kept)
    tars = sorted((out / "shards").glob("*.tar"))
    assert [t.stem for t in tars] == [shard_name(i) for i in range((len(kept) + 3) // 4)]
    first = [n.split(".")[0] for n in tarfile.open(tars[0]).getnames()]
    assert sorted(set(first)) == kept[:4]

    # ledger: kept rows with their signals, output shard and source lineage
    led = pq.read_table(out / "ledger").to_pylist()
    assert [r["key"] for r in led] == kept
    by_key = {t["key"]: t for t in truth()}
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
    assert man["inputs"]["source_stages"] == {"dedup": "dedup000", "download": "d0wn10ad", "score": "5c0re000"}
    counts = man["counts"]
    assert counts["input"] == 27 and counts["kept"] == len(kept)
    assert [c["clause"] for c in counts["clauses"]] == ["downloaded", "clip_score >= 0.25", "lang = 'en'"]
    assert [c["removed"] for c in counts["clauses"]] == [
        sum(1 for v in dropped.values() if v == c) for c in ("downloaded", "clip_score >= 0.25", "lang = 'en'")]


def test_dry_run_prints_counts_per_clause_and_writes_nothing(source, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["export", str(source), "--out", str(out), "--policy", "dedup", "--top-fraction", "0.5",
               "--by", "clip_score", "--dry-run"])
    assert rc == 0
    assert not out.exists()
    lines = {ln.split()[0]: ln.split()[1:] for ln in capsys.readouterr().out.splitlines()[1:]}
    assert lines["input"] == ["27"]
    assert lines["downloaded"] == ["3", "24"]
    assert lines["dedup:not_duplicate"] == ["3", "21"]  # 8, 16 (group of 0) and 10 (group of 2)
    assert lines["dedup:not_eval_contaminated"] == ["1", "20"]
    # 19 of the 20 left have a clip_score (row 20 was not scored): round(0.5 * 19) = 10 kept
    assert lines["top"] == ["0.5", "by", "clip_score", "10", "10"]
    assert lines["kept"] == ["10"]


def test_top_fraction_ranks_the_rows_left_with_ties_to_the_lower_key(source, tmp_path):
    out = tmp_path / "out"
    assert main(["export", str(source), "--out", str(out), "--top-fraction", "0.3", "--by", "clip_score"]) == 0
    scored = [t for t in truth() if t["clip_score"] is not None]
    k = int(np.floor(0.3 * len(scored) + 0.5))
    best = sorted(scored, key=lambda t: (-f32(t["clip_score"]), t["key"]))[:k]
    assert [r["key"] for r in pq.read_table(out / "ledger").to_pylist()] == sorted(t["key"] for t in best)


def test_missing_stage_column_is_an_input_error_naming_column_and_stage(tmp_path, capsys):
    src = make_export_source(tmp_path / "src", with_dedup=False).root
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


def test_rerun_resumes_refuses_another_policy_and_redo_replaces(source, tmp_path, capsys):
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
    kept, _ = expected(truth(), ("dedup:not_duplicate", lambda t: not t["is_duplicate"]),
                       ("dedup:not_eval_contaminated", lambda t: not t["eval_contaminated"]),
                       ("lang = 'en'", lambda t: t["lang"] == "en"))
    assert keys == kept


def test_export_of_an_export_and_empty_selection(source, tmp_path):
    first = tmp_path / "first"
    assert main(["export", str(source), "--out", str(first), "--policy", "dedup"]) == 0
    second = tmp_path / "second"
    # the export's ledger carries the signals, so it can be filtered again without score/dedup dirs
    assert main(["export", str(first), "--out", str(second), "--where", "lang <> 'en'"]) == 0
    keys = [r["key"] for r in pq.read_table(second / "ledger").to_pylist()]
    assert keys == [key_of(r) for r in (5, 13, 21, 22, 23)]
    assert raw_members(second) == {k: v for k, v in raw_members(source).items() if k in keys}
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
    for name in local:  # byte-identical to a local export, and each published shard has its marker
        assert fs.cat(f"/curate-test/exported/shards/{name}") == (tmp_path / "local" / "shards" / name).read_bytes()
        assert fs.exists(f"/curate-test/exported/_done/export/{name[:-4]}.json")
    assert fs.exists("/curate-test/exported/manifest.json")
    # a rerun resumes from the staging dir (every shard already done) and republishes what is missing
    fs.rm("/curate-test/exported/manifest.json")
    assert main([*args, "--out", url, "--staging", str(tmp_path / "staging")]) == 0
    assert fs.exists("/curate-test/exported/manifest.json")
    fs.rm("/curate-test", recursive=True)
