"""MetaCLIP-style balancing: the matcher against a naive substring scan, the SQL reduce against a brute-force
balancer (hypothesis), and `curate balance` + `curate export --policy/--where` end to end on real files."""

from __future__ import annotations

import json
from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dataset_factory import color_image, make_dataset
from helpers import kept_keys
from hypothesis import given, settings
from hypothesis import strategies as st

from curate.balancing import Matcher, draw, load_entries, normalize, reduce_sql
from curate.cli import main
from curate.errors import InputError
from curate.io import manifest
from curate.io.layout import DatasetDir, sample_key, shard_name
from curate.stages.export import ExportConfig

VOCAB = ["cat", "dog", "red car", "car", "the", "a", "tree", "new york", "york", "sky"]


def brute_balance(matches: dict[str, list[int]], t: int, seed: int) -> tuple[set[str], dict[int, set[str]]]:
    """MetaCLIP balancing written the slow, obvious way: each entry takes its t pairs with the smallest
    draw (all of them if it has at most t); a pair is kept if any entry took it."""
    by_entry: dict[int, list[str]] = defaultdict(list)
    for key, ids in matches.items():
        for e in ids:
            by_entry[e].append(key)
    chosen = {e: set(sorted(keys, key=lambda k, e=e: (draw(seed, k, e), k))[:t]) for e, keys in by_entry.items()}
    return set().union(*chosen.values()) if chosen else set(), chosen


def sql_reduce(matches: dict[str, list[int]], seed: int) -> dict[str, dict]:
    import duckdb

    rows = [{"key": k, "shard": "00000", "entry": e, "draw": draw(seed, k, e)} for k, ids in matches.items() for e in ids]
    table = pa.Table.from_pylist(rows, schema=pa.schema([("key", pa.string()), ("shard", pa.string()),
                                                         ("entry", pa.int32()), ("draw", pa.float64())]))
    con = duckdb.connect()
    con.register("matches", table)
    rel = con.sql(reduce_sql())
    out = [dict(zip(rel.columns, row, strict=True)) for row in rel.fetchall()]
    con.close()
    return {r["key"]: r for r in out}


pair_matches = st.dictionaries(
    keys=st.integers(0, 10_000).map(lambda i: f"{i:010d}"),
    values=st.lists(st.integers(0, 7), max_size=4, unique=True),
    min_size=1, max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(matches=pair_matches, t=st.integers(1, 6), seed=st.integers(0, 3))
def test_balancing_caps_every_entry_at_t_and_keeps_entries_under_t(matches, t, seed):
    red = sql_reduce(matches, seed)
    kept = {k for k, r in red.items() if r["rank"] < t}
    want, chosen = brute_balance(matches, t, seed)
    assert kept == want  # the SQL reduce is the brute-force balancer, for every t
    counts: dict[int, int] = defaultdict(int)
    for ids in matches.values():
        for e in ids:
            counts[e] += 1
    for e, keys in chosen.items():
        assert len(keys) == min(counts[e], t) <= t  # each entry contributes at most t pairs, exactly min(count, t)
    for key, ids in matches.items():
        if not ids:
            assert key not in red and key not in kept  # a pair matching nothing is never kept
        if any(counts[e] <= t for e in ids):
            assert key in kept  # every pair of an entry under the cap is kept
        if key in kept:
            assert any(key in chosen[e] for e in ids)  # kept only because some entry selected it
        if ids:
            assert red[key]["min_count"] == min(counts[e] for e in ids)
    # MetaCLIP's independent draws: kept iff some match's draw < t / count
    bern = {k for k, r in red.items() if r["scaled_draw"] < t}
    assert bern == {k for k, ids in matches.items() if any(draw(seed, k, e) < t / counts[e] for e in ids)}


words = st.sampled_from(VOCAB + ["cats", "category", "Dog", "CAR", "yorkshire", "treetop"])
captions = st.lists(st.tuples(words, st.sampled_from(["", ",", ".", "!", " -", "  ", "\t"])), max_size=8).map(
    lambda parts: " ".join(w + p for w, p in parts))


@settings(max_examples=200, deadline=None)
@given(caption=captions)
def test_matcher_equals_a_naive_word_boundary_scan(caption):
    entries = load_entries_from(VOCAB)
    spaced = normalize(caption)
    want = sorted(i for i, e in enumerate(entries) if f" {e} " in spaced)
    assert Matcher(entries).match(caption) == want


def load_entries_from(vocab: list[str]) -> list[str]:
    return sorted({normalize(v).strip() for v in vocab})


def test_matching_is_on_whole_words_case_insensitive():
    entries = load_entries_from(VOCAB)
    m = Matcher(entries)
    found = [entries[i] for i in m.match("A RED car, near the Category: cats in New York!")]
    assert found == ["a", "car", "new york", "red car", "the", "york"]  # not cat (cats, category)
    assert m.match(None) == [] and m.match("") == []


def test_metadata_sources(tmp_path):
    txt = tmp_path / "m.txt"
    txt.write_text("Cat\ndog\n\n  red   car \ncat\n")
    assert load_entries(str(txt)) == ["cat", "dog", "red car"]
    js = tmp_path / "m.json"
    js.write_text(json.dumps(["b", "a"]))
    assert load_entries(str(js)) == ["a", "b"]
    words = load_entries("wordfreq:en:2000")  # shipped with the wordfreq package: offline
    assert 1800 < len(words) <= 2000 and {"the", "dog", "water"} <= set(words)
    assert all(w.replace("'", "").replace("-", "").isalpha() for w in words)
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1}')
    for spec, msg in [(str(bad), "list of strings"), (str(tmp_path / "none.txt"), "cannot read"),
                      ("wordfreq:en", "wordfreq:LANG:N"), ("wordfreq:xx-nope:10", "no word list")]:
        with pytest.raises(InputError, match=msg):
            load_entries(spec)


# ------------------------------------------------------------------------------------- end to end

CAPTIONS = (
    ["a photo of a cat"] * 9 + ["a dog on grass"] * 5 + ["a red car in new york"] * 3
    + ["a cat and a dog", "sky over a tree", "IMG_0001.JPG", "", "cat."]
)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("balance") / "pool"
    samples = [(color_image(i), c, "success") for i, c in enumerate(CAPTIONS)]
    samples.insert(4, (None, "a cat that timed out", "timeout"))  # not downloaded: never a pair
    make_dataset(root, samples, shard_size=6)
    meta = root.parent / "metadata.txt"
    meta.write_text("\n".join(["cat", "dog", "red car", "new york", "tree", "sky", "a", "of"]))
    assert main(["balance", str(root), "--metadata", str(meta), "--seed", "7", "--no-progress"]) == 0
    return DatasetDir.at(root)


def signals(ds: DatasetDir) -> dict[str, dict]:
    return {r["key"]: r for s in ds.shards() for r in pq.read_table(ds.signals("balance", s)).to_pylist()}


def test_stage_writes_per_shard_signals_matching_the_brute_force(pool):
    sig = signals(pool)
    ledger = {r["key"]: r for s in pool.shards() for r in pq.read_table(pool.ledger(s)).to_pylist()}
    ok = {k for k, r in ledger.items() if r["status"] == "success"}
    assert set(sig) == ok  # one row per downloaded pair, none for the failed row
    entries = load_entries(str(pool.root.parent / "metadata.txt"))
    m = Matcher(entries)
    matches = {k: m.match(ledger[k]["caption"]) for k in ok}
    for k, r in sig.items():
        assert r["entries"] == sorted(entries[i] for i in matches[k]) and r["matched"] == len(matches[k])
        assert (r["rank"] is None) == (not matches[k])
    for t in (1, 2, 3, 5, 100):
        want, _ = brute_balance({k: v for k, v in matches.items()}, t, seed=7)
        got = {k for k, r in sig.items() if r["rank"] is not None and r["rank"] < t}
        assert got == want
    man = manifest.load(pool)["stages"]["balance"]
    assert man["status"] == "complete" and man["counts"]["pairs"] == len(ok)
    assert man["counts"]["unmatched_pairs"] == 2  # "IMG_0001.JPG" and ""
    counts = pq.read_table(pool.root / "stats" / "balance" / "entries.parquet").to_pylist()
    assert counts[0] == {"entry": "a", "entry_id": entries.index("a"), "count": 19}  # 9 + 5 + 3 + "a cat and a dog" + "sky over a tree"


def test_export_selects_with_the_balance_columns(pool, tmp_path):
    cfg = ExportConfig(source=str(pool.root), where=("balance_rank < 2",))
    kept = set(kept_keys(cfg))
    sig = signals(pool)
    assert kept == {k for k, r in sig.items() if r["rank"] is not None and r["rank"] < 2}
    # every entry keeps at most 2 pairs of its own choosing, so 8 entries keep at most 16 pairs; the
    # tail entries (tree, sky: 1 pair each) keep theirs
    assert 0 < len(kept) <= 16 and any("tree" in sig[k]["entries"] for k in kept)
    # the built-in policy is t = 20000: everything that matched an entry is kept at this size
    assert set(kept_keys(ExportConfig(source=str(pool.root), policy=("metaclip",)))) == {k for k, r in sig.items() if r["matched"]}
    out = tmp_path / "balanced"
    assert main(["export", str(pool.root), "--out", str(out), "--where", "balance_rank < 2"]) == 0
    got = {r["key"] for s in DatasetDir.at(out).shards() for r in pq.read_table(DatasetDir.at(out).ledger(s)).to_pylist()}
    assert len(got) == len(kept)


def test_rerun_resumes_same_seed_same_signals_other_seed_needs_redo(pool, tmp_path, capsys):
    before = signals(pool)
    meta = str(pool.root.parent / "metadata.txt")
    assert main(["balance", str(pool.root), "--metadata", meta, "--seed", "7", "--no-progress"]) == 0
    assert "0 shard(s) done" in capsys.readouterr().err and signals(pool) == before
    assert main(["balance", str(pool.root), "--metadata", meta, "--seed", "8", "--no-progress"]) == 2
    assert "fingerprint" in capsys.readouterr().err
    # a copy of the pool balanced with another seed from scratch picks other pairs for the full entries
    import shutil

    other = tmp_path / "copy"
    shutil.copytree(pool.root, other)
    assert main(["balance", str(other), "--metadata", meta, "--seed", "8", "--no-progress", "--redo"]) == 0
    after = signals(DatasetDir.at(other))
    assert {k: r["entries"] for k, r in after.items()} == {k: r["entries"] for k, r in before.items()}
    assert {k: r["rank"] for k, r in after.items()} != {k: r["rank"] for k, r in before.items()}


def test_bad_metadata_exits_2_naming_it(pool, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["balance", str(pool.root), "--metadata", str(empty), "--redo", "--no-progress"]) == 2
    assert "empty.txt: no entries" in capsys.readouterr().err


def test_default_metadata_is_the_offline_word_list(tmp_path):
    ds = make_dataset(tmp_path / "ds", [(color_image(i), c, "success") for i, c in
                                        enumerate(["a photo of a cat", "zzqx", "the dog"])], shard_size=2)
    assert main(["balance", str(ds.root), "--no-progress"]) == 0
    sig = signals(ds)
    first, second = sample_key(shard_name(0), 0), sample_key(shard_name(0), 1)
    assert sig[first]["entries"] == ["a", "cat", "of", "photo"] and sig[second]["matched"] == 0
    assert manifest.load(ds)["stages"]["balance"]["config"]["metadata"] == "wordfreq:en:50000"


@pytest.mark.spark
@pytest.mark.slow  # a Spark session: about a minute on 2 shared cores
def test_spark_reduce_equals_duckdb(pool, tmp_path):
    import shutil

    other = tmp_path / "spark"
    shutil.copytree(pool.root, other)
    meta = str(pool.root.parent / "metadata.txt")
    assert main(["balance", str(other), "--metadata", meta, "--seed", "7", "--redo", "--no-progress",
                 "--engine", "spark", "--spark-master", "local[1]"]) == 0
    assert signals(DatasetDir.at(other)) == signals(pool)


def test_a_lost_match_file_or_signal_table_is_rebuilt_on_resume(pool, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(pool.root, copy)
    ds = DatasetDir.at(copy)
    before = signals(ds)
    meta = str(pool.root.parent / "metadata.txt")
    args = ["balance", str(copy), "--metadata", meta, "--seed", "7", "--no-progress"]
    lost, other = ds.shards()[1], ds.shards()[2]
    ds.signals("balance", lost).unlink()  # a signal table lost after its marker: only its write task reruns
    stamp = {s: ds.signals("balance", s).stat().st_mtime_ns for s in ds.shards() if s != lost}
    capsys.readouterr()
    assert main(args) == 0
    assert "1 shard(s) done" in capsys.readouterr().err
    assert signals(ds) == before and {s: ds.signals("balance", s).stat().st_mtime_ns for s in stamp} == stamp
    # a lost match file: that match task reruns, and then the reduce and every write task (a new reduce)
    matches = ds.work("balance") / "matches"
    (matches / f"{lost}.parquet").unlink()
    kept = (matches / f"{other}.parquet").stat().st_mtime_ns
    assert main(args) == 0
    assert (matches / f"{other}.parquet").stat().st_mtime_ns == kept  # the other match tasks did not run
    assert signals(ds) == before and ds.done_shards("balance") == ds.shards()
