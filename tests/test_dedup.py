"""dedup: planted duplicate groups in synthetic embeddings, keep policies, shard-order independence,
--against, resume after a kill, and workers=2 == workers=1, all through `curate dedup` on real files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dataset_factory import color_image, make_dataset

from curate.cli import main
from curate.io import manifest
from curate.io.atomic import write_json
from curate.io.layout import DatasetDir, row_of_key, sample_key, shard_index, shard_name, shard_of_key
from curate.io.ledger import LEDGER_FIELDS
from curate.io.tables import write_table
from curate.stages.score import signal_schema

D = 32


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def near_copy(v: np.ndarray, cos: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at cosine `cos` from unit vector `v`."""
    z = rng.standard_normal(len(v))
    z = unit(z - (z @ v) * v)
    return cos * v + np.sqrt(1 - cos**2) * z


def planted(n: int = 240, seed: int = 0) -> tuple[np.ndarray, list[list[int]]]:
    """n random unit vectors (random 32-d vectors stay below cosine ~0.8) with planted groups: rows 10+5g..
    are copies of row 5g at cosine 0.96..0.99 (within the default threshold 0.95)."""
    rng = np.random.default_rng(seed)
    emb = unit(rng.standard_normal((n, D)))
    groups = []
    for g, (orig, copies) in enumerate([(3, [101, 202]), (50, [51]), (77, [140, 141, 230]), (199, [12])]):
        for c, row in enumerate(copies):
            emb[row] = near_copy(emb[orig], 0.96 + 0.01 * ((g + c) % 4), rng)
        groups.append(sorted([orig, *copies]))
    return emb, groups


def save_npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)


def key_of(i: int) -> str:
    return sample_key(shard_name(i // 50), i % 50)


def write_scored(root: Path, emb: np.ndarray, clip: np.ndarray | None = None, sha: list[str | None] | None = None,
                 placement: list[str] | None = None) -> DatasetDir:
    """A downloaded + scored dataset dir: row i has key key_of(i) and lives in shard placement[i] (default: the
    shard its key names); ledger, score table, float16 embeddings and markers as the real stages write them."""
    ds = DatasetDir.at(root)
    n = len(emb)
    clip = np.linspace(0.2, 0.3, n) if clip is None else clip
    sha = sha or [f"{i:064x}" for i in range(n)]
    placement = placement or [shard_of_key(key_of(i)) for i in range(n)]
    for shard in sorted(set(placement)):
        rows = [i for i in range(n) if placement[i] == shard]
        ledger = [{"key": key_of(i), "shard": shard, "row": i, "url": f"http://127.0.0.1/{i}.jpg", "caption": "c",
                   "status": "success", "attempts": 1, "sha256": sha[i]} for i in rows]
        # one failed row per shard: no score row with an embedding, no dedup row
        ledger.append({"key": f"{shard}99999", "shard": shard, "row": 10_000, "url": "http://127.0.0.1/x",
                       "status": "timeout", "error_code": "timeout", "attempts": 1})
        write_table(ds.ledger(shard), pa.Table.from_pylist(ledger, schema=pa.schema(LEDGER_FIELDS)))
        # embeddings stored in reverse order, so emb_row != position in the table
        score = [{"key": key_of(i), "scored": True, "clip_score": float(clip[i]), "emb_row": len(rows) - 1 - r}
                 for r, i in enumerate(rows)]
        score.append({"key": f"{shard}99999", "scored": False, "skip_reason": "timeout", "emb_row": -1})
        arr = np.asarray(emb[rows[::-1]], np.float16)
        save_npy(ds.signals("score", shard, ".img_emb.npy"), arr)
        write_table(ds.signals("score", shard), pa.Table.from_pylist(score, schema=signal_schema()))
        write_json(ds.marker("download", shard), {"shard": shard})
        write_json(ds.marker("score", shard), {"shard": shard})
    return ds


def dedup_table(ds: DatasetDir) -> pa.Table:
    files = sorted((ds.root / "signals" / "dedup").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in files]).sort_by("key")


def run(ds: DatasetDir, *args: str) -> int:
    return main(["dedup", str(ds.root), "--no-progress", *args])


def found_groups(t: pa.Table) -> list[list[int]]:
    rows = t.to_pylist()
    pos = {key_of(i): i for i in range(len(rows))}
    by: dict[int, list[int]] = {}
    for r in rows:
        if r["dup_group"] >= 0:
            by.setdefault(r["dup_group"], []).append(pos[r["key"]])
    return sorted(sorted(v) for v in by.values())


def test_planted_groups_found_exactly_with_exact_duplicates(tmp_path):
    emb, groups = planted()
    sha = [f"{i:064x}" for i in range(len(emb))]
    sha[20] = sha[30]  # same bytes, different (unrelated) embeddings: joined by sha256 alone
    ds = write_scored(tmp_path / "ds", emb, sha=sha)
    assert run(ds) == 0
    t = dedup_table(ds)
    assert t.num_rows == len(emb)  # one row per scored sample; the failed rows have none
    counts = manifest.load(ds)["stages"]["dedup"]["counts"]
    assert counts["groups"] == 5 and counts["exact_duplicates"] == 2
    assert counts["duplicates"] == sum(len(g) - 1 for g in groups) + 1
    assert counts["near_duplicate_pairs"] >= sum(len(g) - 1 for g in groups)  # every copy-original pair
    assert found_groups(t) == sorted([*groups, [20, 30]])
    rows = {r["key"]: r for r in t.to_pylist()}
    assert rows[key_of(20)]["exact_dup"] and rows[key_of(30)]["exact_dup"]
    assert not rows[key_of(3)]["exact_dup"]
    # nn_similarity: the planted copy's cosine (float16 storage), and the neighbour's key
    cos = float(np.asarray(emb[50], np.float16).astype(np.float32) @ np.asarray(emb[51], np.float16).astype(np.float32))
    assert rows[key_of(51)]["nn_key"] == key_of(50)
    assert rows[key_of(51)]["nn_similarity"] == pytest.approx(cos, abs=1e-5)
    # an ungrouped sample has its nearest neighbour too, below the threshold
    assert rows[key_of(5)]["dup_group"] == -1 and rows[key_of(5)]["nn_similarity"] < 0.95
    assert not rows[key_of(5)]["is_duplicate"] and rows[key_of(5)]["kept_key"] == key_of(5)
    assert all(r["eval_contaminated"] is False and r["eval_similarity"] is None for r in rows.values())
    # a threshold above every planted cosine leaves only the sha256 group
    assert run(ds, "--threshold", "0.995", "--redo") == 0
    assert found_groups(dedup_table(ds)) == [[20, 30]]


def test_keep_policies(tmp_path):
    emb, groups = planted()
    clip = np.full(len(emb), 0.25)
    clip[140], clip[230] = 0.31, 0.31  # tie on the best score in group [77, 140, 141, 230]: lowest key wins
    clip[50] = 0.10
    ds = write_scored(tmp_path / "ds", emb, clip=clip)

    def kept(policy: str, *extra: str) -> dict[str, str]:
        assert run(ds, "--keep", policy, "--redo", *extra) == 0
        t = dedup_table(ds).to_pylist()
        for r in t:
            assert r["is_duplicate"] == (r["dup_group"] >= 0 and r["kept_key"] != r["key"])
        return {r["key"]: r["kept_key"] for r in t}

    best = kept("best-clip-score")
    assert best[key_of(77)] == best[key_of(141)] == key_of(140)
    assert best[key_of(50)] == key_of(51)
    first = kept("first")
    assert first[key_of(140)] == key_of(77) and first[key_of(101)] == key_of(3) and first[key_of(3)] == key_of(3)
    # with one cluster every sample's centroid is the same one: the pick is the lowest cosine to it
    far = kept("farthest-from-centroid", "--k", "1")
    x = np.asarray(emb, np.float16).astype(np.float32)
    centroid = np.load(ds.root / "_work" / "dedup" / "centroids.npy")[0]
    assert np.linalg.norm(centroid) == pytest.approx(1.0, abs=1e-5)
    for g in groups:
        expect = min(g, key=lambda i: (float(x[i] @ centroid), i))
        assert {far[key_of(i)] for i in g} == {key_of(expect)}


def test_shard_order_does_not_change_decisions(tmp_path):
    emb, _ = planted()
    a = write_scored(tmp_path / "a", emb)
    rng = np.random.default_rng(7)
    # the same keys spread over other shard files, in another order
    placement = [shard_name(int(s)) for s in rng.integers(0, 7, len(emb))]
    b = write_scored(tmp_path / "b", emb, placement=placement)
    assert run(a) == 0 and run(b) == 0
    ta, tb = dedup_table(a), dedup_table(b)
    assert ta.equals(tb)
    assert sorted(p.stem for p in (b.root / "signals" / "dedup").glob("*.parquet")) == sorted(set(placement))


def test_against_flags_near_copy_and_equal_bytes(tmp_path):
    rng = np.random.default_rng(3)
    eval_emb = unit(rng.standard_normal((60, D)))
    ev = write_scored(tmp_path / "eval", eval_emb, sha=[f"e{i:063x}" for i in range(60)])
    emb, _ = planted()
    emb[8] = near_copy(eval_emb[5], 0.97, rng)  # a resized copy of an eval image
    sha = [f"{i:064x}" for i in range(len(emb))]
    sha[9] = f"e{17:063x}"  # byte-equal to eval image 17
    ds = write_scored(tmp_path / "ds", emb, sha=sha)
    assert run(ds, "--against", str(ev.root), "--eval-threshold", "0.95") == 0
    rows = {r["key"]: r for r in dedup_table(ds).to_pylist()}
    flagged = sorted(k for k, r in rows.items() if r["eval_contaminated"])
    assert flagged == sorted([key_of(8), key_of(9)])
    assert rows[key_of(8)]["eval_similarity"] == pytest.approx(0.97, abs=3e-3)
    assert all(r["eval_similarity"] is not None and r["eval_similarity"] < 0.9
               for k, r in rows.items() if k not in flagged)


def test_resume_after_completion_kill_and_lost_pair_files(tmp_path):
    emb, _ = planted()
    ds = write_scored(tmp_path / "ds", emb)
    assert run(ds, "--tasks", "3") == 0
    want = dedup_table(ds)
    pairs = sorted((ds.root / "_work" / "dedup" / "pairs").glob("*.npz"))
    assert [p.stem for p in pairs] == ["c00000", "c00001", "c00002"]
    # rerun after completion: nothing recomputed, same table
    mtimes = [p.stat().st_mtime_ns for p in pairs]
    assert run(ds, "--tasks", "3") == 0
    assert [p.stat().st_mtime_ns for p in pairs] == mtimes
    assert dedup_table(ds).equals(want)
    # a kill mid-way: one task's marker never written, another's pair file lost, no signal tables yet
    ds.marker("dedup", "c00001").unlink()
    pairs[2].unlink()
    shutil.rmtree(ds.root / "signals" / "dedup")
    assert run(ds, "--tasks", "3") == 0
    assert dedup_table(ds).equals(want)
    # a kill during plan (no plan.json): everything is rebuilt, same decisions
    (ds.root / "_work" / "dedup" / "plan.json").unlink()
    assert run(ds, "--tasks", "3") == 0
    assert dedup_table(ds).equals(want)
    # another config on the same dir is refused without --redo
    assert run(ds, "--tasks", "3", "--threshold", "0.9") == 2


def test_local_workers_two_equals_one(tmp_path):
    emb, _ = planted()
    one = write_scored(tmp_path / "one", emb)
    two = write_scored(tmp_path / "two", emb)
    assert run(one, "--tasks", "2") == 0
    assert run(two, "--tasks", "2", "--workers", "2") == 0
    assert dedup_table(one).equals(dedup_table(two))


def test_bad_inputs_exit_2(tmp_path, capsys):
    ds = DatasetDir.at(tmp_path / "empty")
    ds.root.mkdir()
    assert run(ds) == 2
    err = capsys.readouterr().err
    assert "signals/score" in err and "curate score" in err
    emb, _ = planted()
    ok = write_scored(tmp_path / "ok", emb)
    assert run(ok, "--threshold", "1.5") == 2
    assert "--threshold" in capsys.readouterr().err
    assert run(ok, "--k", "many") == 2
    np.save(ok.signals("score", "00000000", ".img_emb.npy"), np.zeros((3, D), np.float16))
    assert run(ok) == 2
    assert "00000000.img_emb.npy" in capsys.readouterr().err


def test_phash_joins_reencoded_images(tmp_path):
    """Two JPEG encodings of one picture with unrelated embeddings: only --phash groups them."""

    images = [color_image(i, (128, 128)) for i in range(6)]
    images.append(images[2].resize((96, 96)).resize((128, 128)))
    ds = make_dataset(tmp_path / "ds", [(im, "c", "success") for im in images], shard_size=4)
    rng = np.random.default_rng(0)
    emb = unit(rng.standard_normal((len(images), D)))
    for shard in ds.shards():
        keys = pq.read_table(ds.ledger(shard))["key"].to_pylist()
        idx = [shard_index(shard_of_key(k)) * 4 + row_of_key(k) for k in keys]
        save_npy(ds.signals("score", shard, ".img_emb.npy"), np.asarray(emb[idx], np.float16))
        score = [{"key": k, "scored": True, "clip_score": 0.3, "emb_row": r} for r, k in enumerate(keys)]
        write_table(ds.signals("score", shard), pa.Table.from_pylist(score, schema=signal_schema()))
        write_json(ds.marker("score", shard), {"shard": shard})
    assert run(ds) == 0
    assert (dedup_table(ds)["dup_group"].to_numpy() == -1).all()
    assert run(ds, "--phash", "--redo") == 0
    groups = {r["key"]: r["dup_group"] for r in dedup_table(ds).to_pylist()}
    assert groups["0000000000002"] == groups["0000000100002"] >= 0
    assert sum(g >= 0 for g in groups.values()) == 2


def test_core_merge_and_groups_do_not_depend_on_task_order():
    from curate import semdedup as sd

    emb, groups = planted()
    ids, _ = sd.assign(emb, sd.train_centroids(emb, 4, 0), 2)
    parts = [sd.cluster_pairs(emb, ids, range(a, a + 1), 0.95) for a in range(4)]
    fwd, rev = sd.merge_pairs(parts, len(emb)), sd.merge_pairs(parts[::-1], len(emb))
    for x, y in zip(fwd, rev, strict=True):
        assert np.array_equal(x, y)
    g = sd.groups(len(emb), fwd[0], fwd[1])
    assert sorted(sorted(np.flatnonzero(g == v).tolist()) for v in range(g.max() + 1)) == sorted(groups)
    assert g[groups[0][0]] == 0  # numbered by lowest row
    # sha256-style equality pairs ignore missing values
    i, j = sd.equal_value_pairs(np.array(["a", None, "b", "a", "", "a"], dtype=object))
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 3), (0, 5)]


def test_rescoring_invalidates_dedup(tmp_path):
    """The score stage's fingerprint is part of dedup's: after a rescore, a plain rerun is refused."""
    emb, _ = planted()
    ds = write_scored(tmp_path / "ds", emb)
    manifest.record_stage(ds, "score", config={}, fingerprint="score-a")
    assert run(ds) == 0
    assert run(ds) == 0
    manifest.record_stage(ds, "score", config={}, fingerprint="score-b")
    assert run(ds) == 2
    assert run(ds, "--redo") == 0


@pytest.mark.spark
def test_spark_engine_equals_local(tmp_path, monkeypatch):
    """Each Spark task takes a range of clusters; the decisions are those of the local engine."""
    pytest.importorskip("pyspark")
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    emb, _ = planted()
    local = write_scored(tmp_path / "local", emb)
    spark = write_scored(tmp_path / "spark", emb)
    assert run(local, "--tasks", "3") == 0
    assert run(spark, "--tasks", "3", "--engine", "spark", "--spark-master", "local[2]") == 0
    assert sorted(p.stem for p in (spark.root / "_work" / "dedup" / "pairs").glob("*.npz")) == \
        ["c00000", "c00001", "c00002"]
    assert dedup_table(local).equals(dedup_table(spark))
