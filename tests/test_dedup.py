"""dedup: planted duplicate groups in synthetic embeddings, keep policies, shard-order independence,
--against, resume after a kill, and workers=2 == workers=1, all through `curate dedup` on real files."""

from __future__ import annotations

import shutil
from collections import Counter
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


def with_near_copies(n: int, copies: int, seed: int) -> np.ndarray:
    """planted(n) with rows n/2 .. n/2 + copies near copies (cosine 0.955..0.99) of rows 0 .. copies, as the
    float16 embeddings score writes."""
    emb, _ = planted(n, seed=seed)
    rng = np.random.default_rng(seed)
    emb[n // 2:n // 2 + copies] = [near_copy(emb[i], rng.uniform(0.955, 0.99), rng) for i in range(copies)]
    return np.asarray(emb, np.float16)


def save_npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)


def key_of(i: int) -> str:
    return sample_key(shard_name(i // 50), i % 50)


def write_scored(root: Path, emb: np.ndarray, clip: np.ndarray | None = None, sha: list[str | None] | None = None,
                 placement: list[str] | None = None) -> DatasetDir:
    """A downloaded + scored dataset dir: row i has key key_of(i) and lives in shard placement[i] (default: the
    shard its key names); ledger, score table, float16 embeddings and markers as the real stages write them.

    The embeddings are planted, not scored: dedup's keep rule and pair search are tested on chosen geometry
    (near pairs, chains, cluster borders) that no model gives on demand; the tables use score's own schema."""
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


def plant_scores(ds: DatasetDir, emb: np.ndarray, shard_size: int) -> None:
    """Score tables and embeddings for a make_dataset dir's real tars: image i gets emb[i] (the picture's pixels
    are real, for the pHash evidence; the geometry is chosen, as no tiny model gives it on demand)."""
    for shard in ds.shards():
        keys = pq.read_table(ds.ledger(shard))["key"].to_pylist()
        idx = [shard_index(shard_of_key(k)) * shard_size + row_of_key(k) for k in keys]
        save_npy(ds.signals("score", shard, ".img_emb.npy"), np.asarray(emb[idx], np.float16))
        score = [{"key": k, "scored": True, "clip_score": 0.3, "emb_row": r} for r, k in enumerate(keys)]
        write_table(ds.signals("score", shard), pa.Table.from_pylist(score, schema=signal_schema()))
        write_json(ds.marker("score", shard), {"shard": shard})


def dedup_table(ds: DatasetDir) -> pa.Table:
    files = sorted((ds.root / "signals" / "dedup").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in files]).sort_by("key")


def run(ds: DatasetDir, *args: str) -> int:
    # these datasets plant embeddings, not pictures: the pixel check (on by default) is off unless a test asks
    return main(["dedup", str(ds.root), "--no-progress", "--no-phash", *args])


def reference(emb: np.ndarray, prio: np.ndarray, sha: list[str | None] | None, threshold: float = 0.95
              ) -> dict[int, int]:
    """SemDeDup's rule by brute force: rows in keep order (priority, then lowest key); a row is dropped when it is
    within the threshold of (or byte-equal to) a row already kept, and points to the first such kept row.
    Returns {dropped row: kept row}."""
    x = np.asarray(emb, np.float16).astype(np.float32)
    sims = x @ x.T
    kept: list[int] = []
    out = {}
    for i in sorted(range(len(emb)), key=lambda r: (-prio[r], key_of(r))):
        hit = next((j for j in kept if sims[i, j] >= threshold or (sha and sha[i] is not None and sha[i] == sha[j])),
                   None)
        if hit is None:
            kept.append(i)
        else:
            out[i] = hit
    return out


def decisions(t: pa.Table) -> dict[int, int]:
    """{dropped row: kept row} from a dedup signal table, checking the columns agree with each other."""
    pos = {key_of(i): i for i in range(t.num_rows)}
    rows = t.to_pylist()
    out = {pos[r["key"]]: pos[r["kept_key"]] for r in rows if r["is_duplicate"]}
    kept_group = {r["key"]: r["dup_group"] for r in rows if not r["is_duplicate"]}
    for r in rows:
        assert r["is_duplicate"] == (r["kept_key"] != r["key"]) == (r["dup_evidence"] is not None)
        if r["is_duplicate"]:
            assert r["dup_group"] >= 0 and kept_group[r["kept_key"]] == r["dup_group"]
            assert r["kept_key"] not in out  # the sample a row duplicates is always a kept one
    return out


def test_planted_decisions_are_semdedups_rule_with_exact_duplicates(tmp_path):
    emb, groups = planted()
    sha = [f"{i:064x}" for i in range(len(emb))]
    sha[20] = sha[30]  # same bytes, different (unrelated) embeddings: joined by sha256 alone
    clip = np.linspace(0.2, 0.3, len(emb))
    ds = write_scored(tmp_path / "ds", emb, clip=clip, sha=sha)
    assert run(ds) == 0
    t = dedup_table(ds)
    assert t.num_rows == len(emb)  # one row per scored sample; the failed rows have none
    want = reference(emb, clip, sha)
    assert decisions(t) == want and len(want) >= 6
    counts = manifest.load(ds)["stages"]["dedup"]["counts"]
    assert counts["duplicates"] == len(want) and counts["exact_duplicates"] == 2
    assert counts["groups"] == len(set(want.values()))
    assert counts["drops_by_evidence"] == {"exact": 1, "phash": 0, "near": len(want) - 1}
    # every planted copy-original pair is a near pair (copies of one original may be below the threshold)
    assert counts["near_duplicate_pairs"] >= sum(len(g) - 1 for g in groups)
    rows = {r["key"]: r for r in t.to_pylist()}
    assert rows[key_of(20)]["exact_dup"] and rows[key_of(30)]["exact_dup"]
    assert rows[key_of(20)]["dup_evidence"] == "exact" and rows[key_of(20)]["kept_key"] == key_of(30)
    assert not rows[key_of(3)]["exact_dup"]
    # nn_similarity: the planted copy's cosine (float16 storage), and the neighbour's key
    cos = float(np.asarray(emb[50], np.float16).astype(np.float32) @ np.asarray(emb[51], np.float16).astype(np.float32))
    assert rows[key_of(51)]["nn_key"] == key_of(50)
    assert rows[key_of(51)]["nn_similarity"] == pytest.approx(cos, abs=1e-5)
    # an ungrouped sample has its nearest neighbour too, below the threshold
    assert rows[key_of(5)]["dup_group"] == -1 and rows[key_of(5)]["nn_similarity"] < 0.95
    assert not rows[key_of(5)]["is_duplicate"] and rows[key_of(5)]["kept_key"] == key_of(5)
    assert all(r["eval_contaminated"] is False and r["eval_similarity"] is None for r in rows.values())
    # a threshold above every planted cosine leaves only the sha256 duplicate
    assert run(ds, "--threshold", "0.995", "--redo") == 0
    assert decisions(dedup_table(ds)) == {20: 30}


def chain(n: int, step: float = 0.97) -> np.ndarray:
    """n unit vectors on a great circle, neighbours at cosine `step` (0.97: two steps apart is 0.88)."""
    angle = np.arccos(step) * np.arange(n)
    out = np.zeros((n, D))
    out[:, 0], out[:, 1] = np.cos(angle), np.sin(angle)
    return out


def test_chain_keeps_both_ends_and_groups_do_not_grow_by_chaining(tmp_path):
    rng = np.random.default_rng(1)
    emb = unit(rng.standard_normal((60, D)))
    emb[:3] = chain(3)  # rows 0 ~ 1 ~ 2, with 0 and 2 beyond the threshold
    emb[10:30] = chain(20) @ np.linalg.qr(rng.standard_normal((D, D)))[0]  # a chain of 20 look-alikes
    ds = write_scored(tmp_path / "ds", emb)
    assert run(ds, "--keep", "first") == 0
    t = dedup_table(ds)
    got = decisions(t)
    assert got[1] == 0 and 2 not in got  # a kept, b dropped as a's duplicate, c kept: no transitive closure
    assert got == reference(emb, np.zeros(len(emb)), None)
    sizes = Counter(g for g in t["dup_group"].to_pylist() if g >= 0)
    assert max(sizes.values()) <= 2  # along a chain, a kept sample's group is itself and its next neighbour
    assert len(got) == 1 + 10  # every other sample of the chain of 20 is kept
    # when the middle sample is the best one, it is kept and both ends are its duplicates
    clip = np.full(len(emb), 0.2)
    clip[1] = 0.3
    ds2 = write_scored(tmp_path / "ds2", emb, clip=clip)
    assert run(ds2, "--keep", "best-clip-score") == 0
    got2 = decisions(dedup_table(ds2))
    assert got2[0] == got2[2] == 1


def test_keep_policies(tmp_path):
    emb, groups = planted()
    clip = np.full(len(emb), 0.25)
    clip[140], clip[230] = 0.31, 0.31  # tie on the best score in group [77, 140, 141, 230]: lowest key wins
    clip[50] = 0.10
    ds = write_scored(tmp_path / "ds", emb, clip=clip)

    def dropped(policy: str, *extra: str) -> dict[int, int]:
        assert run(ds, "--keep", policy, "--redo", *extra) == 0
        return decisions(dedup_table(ds))

    best = dropped("best-clip-score")
    assert best == reference(emb, clip, None)
    assert best[77] == best[141] == 140 and 140 not in best
    assert best[50] == 51
    first = dropped("first")
    assert first == reference(emb, np.zeros(len(emb)), None)
    assert first[140] == 77 and first[101] == 3 and 3 not in first
    # with one cluster every sample's centroid is the same one: the pick is the lowest cosine to it
    far = dropped("farthest-from-centroid", "--k", "1")
    x = np.asarray(emb, np.float16).astype(np.float32)
    centroid = np.load(ds.root / "_work" / "dedup" / "centroids.npy")[0]
    assert np.linalg.norm(centroid) == pytest.approx(1.0, abs=1e-5)
    assert far == reference(emb, -(x @ centroid), None)
    for g in groups:
        expect = min(g, key=lambda i: (float(x[i] @ centroid), i))
        assert expect not in far and any(far.get(i) == expect for i in g)


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


def test_resume_after_completion_lost_work_files_and_markers(tmp_path):
    emb, _ = planted()
    ds = write_scored(tmp_path / "ds", emb)
    assert run(ds, "--tasks", "3") == 0
    want = dedup_table(ds)
    wd = ds.root / "_work" / "dedup"
    assert sorted(p.name for p in (wd / "pairs").glob("*.edges.npy")) == [f"0000{i}.edges.npy" for i in range(3)]
    done = {p.stem for p in (ds.root / "_done" / "dedup").glob("*.json")}
    assert {f"decide.{shard_name(0)}", "pairs.00000", f"assign.{shard_name(0)}", shard_name(0)} <= done
    assert ds.done_shards("dedup") == sorted({shard_of_key(key_of(i)) for i in range(len(emb))})
    # rerun after completion: nothing recomputed, same table
    outputs = sorted(p for p in wd.rglob("*") if p.is_file()) + sorted((ds.root / "signals" / "dedup").glob("*"))
    mtimes = [p.stat().st_mtime_ns for p in outputs]
    assert run(ds, "--tasks", "3") == 0
    assert [p.stat().st_mtime_ns for p in outputs] == mtimes
    assert dedup_table(ds).equals(want)
    # a kill at various points: markers never written, work files lost, tmp files left, no signal tables yet
    ds.marker("dedup", "pairs.00001").unlink()
    (wd / "pairs" / "00002.nn.npy").unlink()
    (wd / "bucket" / f"{shard_name(3)}.npy").unlink()
    (wd / "decide" / "summary.json").unlink()
    (wd / "decide" / f"{shard_name(1)}.npy").unlink()
    (wd / "pairs" / ".tmp-0123456789ab-00001.edges.npy").write_bytes(b"partial")
    shutil.rmtree(ds.root / "signals" / "dedup")
    ds.marker("dedup", shard_name(2)).unlink()
    assert run(ds, "--tasks", "3") == 0
    assert dedup_table(ds).equals(want)
    # a kill during plan (no plan.json): everything is rebuilt, same decisions
    (wd / "plan.json").unlink()
    assert run(ds, "--tasks", "3") == 0
    assert dedup_table(ds).equals(want)
    # another config on the same dir is refused without --redo
    assert run(ds, "--tasks", "3", "--threshold", "0.9") == 2


def test_killed_process_mid_run_then_rerun_gives_the_same_outputs(tmp_path):
    """A real SIGKILL of `curate dedup` once some tasks are done (a kill inside a task or between phases)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    rng = np.random.default_rng(5)
    emb, _ = planted(1000, seed=2)
    emb[200:260] = [near_copy(emb[i], 0.97, rng) for i in range(60)]
    clean = write_scored(tmp_path / "clean", emb)
    assert run(clean, "--tasks", "6", "--device", "cpu") == 0
    want = dedup_table(clean)
    for marker_glob in ("assign.*.json", "pairs.*.json", "decide.json"):
        ds = write_scored(tmp_path / marker_glob.split(".")[0], emb)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen([sys.executable, "-m", "curate.cli", "dedup", str(ds.root), "--no-progress", "--no-phash",
                                 "--tasks", "6", "--device", "cpu"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if list((ds.root / "_done" / "dedup").glob(marker_glob)):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait()
        assert run(ds, "--tasks", "6", "--device", "cpu") == 0
        assert dedup_table(ds).equals(want)


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
    plant_scores(ds, emb, shard_size=4)
    assert run(ds) == 0
    assert (dedup_table(ds)["dup_group"].to_numpy() == -1).all()
    assert run(ds, "--phash", "--phash-distance", "-1", "--redo") == 0  # equal 64-bit pHashes group
    groups = {r["key"]: r["dup_group"] for r in dedup_table(ds).to_pylist()}
    assert groups["0000000000002"] == groups["0000000100002"] >= 0
    assert sum(g >= 0 for g in groups.values()) == 2


def test_phash_distance_confirms_near_pairs(tmp_path, capsys):
    """A model that packs every image close together (all embeddings within cosine 0.99) makes every pair a near
    pair; with --phash-distance only the pair whose pictures match (a downscaled copy) stays a duplicate."""
    import imagehash

    images = [color_image(i, (128, 128)) for i in range(6)]
    images.append(images[2].resize((100, 100)).resize((128, 128)))  # a resized copy: pHash close, not equal
    ph = [imagehash.phash(im, hash_size=16) for im in images]
    assert imagehash.phash(images[6]) != imagehash.phash(images[2])  # no equal-pHash edge: the near edge decides
    assert 0 < ph[6] - ph[2] <= 16 and min(ph[i] - ph[j] for i in range(6) for j in range(i)) > 64  # the premise
    ds = make_dataset(tmp_path / "ds", [(im, "c", "success") for im in images], shard_size=4)
    rng = np.random.default_rng(0)
    base = unit(rng.standard_normal(D))
    emb = np.stack([near_copy(base, 0.995, rng) for _ in images])
    plant_scores(ds, emb, shard_size=4)
    assert run(ds, "--threshold", "0.98") == 0
    assert int(dedup_table(ds)["is_duplicate"].to_numpy().sum()) == len(images) - 1  # one kept, the rest dropped
    assert run(ds, "--threshold", "0.98", "--phash", "--phash-distance", "16", "--redo") == 0
    rows = {r["key"]: r for r in dedup_table(ds).to_pylist()}
    dropped = {k: (r["kept_key"], r["dup_evidence"]) for k, r in rows.items() if r["is_duplicate"]}
    assert dropped == {"0000000100002": ("0000000000002", "near")}
    counts = manifest.load(ds)["stages"]["dedup"]["counts"]
    assert counts["near_pairs_without_phash_match"] == 20  # 21 pairs, one confirmed
    assert counts["drops_by_evidence"] == {"exact": 0, "phash": 0, "near": 1}
    capsys.readouterr()
    assert run(ds, "--phash-distance", "8") == 2  # needs --phash
    assert "--phash-distance" in capsys.readouterr().err


def test_greedy_rule_on_a_chain_and_a_star():
    from curate.stages.dedup import core as sd

    # ranks 0 ~ 1 ~ 2 ~ 3 (a path): 0 kept, 1 dropped by 0, 2 kept (its only higher neighbour is dropped), 3 by 2
    kept_by, ev = sd.greedy_keep(4, np.array([0, 1, 2]), np.array([1, 2, 3]), np.array([1, 1, 1]))
    assert kept_by.tolist() == [-1, 0, -1, 2] and ev.tolist() == [0, 1, 0, 1]
    # the same edge found twice and with two kinds of evidence; the highest kept node is the one named
    kept_by, ev = sd.greedy_keep(5, np.array([1, 0, 0, 3, 1]), np.array([4, 4, 4, 4, 2]),
                                 np.array([sd.NEAR, sd.NEAR, sd.EXACT, sd.NEAR, sd.PHASH]))
    assert kept_by.tolist() == [-1, -1, 1, -1, 0]
    assert sd.strongest(ev).tolist() == [0, 0, sd.PHASH, 0, sd.EXACT]
    # key hashes do not depend on the width of the key array
    assert np.array_equal(sd.key_hash(np.array([b"ab", b"c"], "S2"), 3), sd.key_hash(np.array([b"ab", b"c"], "S9"), 3))
    assert not np.array_equal(sd.key_hash(np.array([b"ab"]), 3), sd.key_hash(np.array([b"ab"]), 4))


def test_pair_tasks_are_cut_by_estimated_entries():
    from curate.stages.dedup import groups_for

    sizes = np.ones(100, np.int64)
    sizes[10:15] = 60  # a run of big clusters: equal cluster counts would give one task most of the work
    b = groups_for(10_000, 100, 4, sizes)
    assert b[0] == 0 and b[-1] == 100 and b == sorted(set(b)) and len(b) == 5
    loads = [int(sizes[lo:hi].sum()) for lo, hi in zip(b, b[1:], strict=False)]
    assert max(loads) <= 2 * sizes.sum() / 4  # within 2x of the mean (clusters are not split)
    assert groups_for(10_000, 100, 4) == [0, 25, 50, 75, 100]


def test_torch_path_gives_the_numpy_faiss_decisions():
    """The GPU code path (torch assignment and bounded pair search) run on the CPU: the same arrays as faiss/numpy,
    on the float16 embeddings the stage reads."""
    import torch

    from curate.stages.dedup import core as sd

    x = with_near_copies(600, 60, seed=4)
    c = sd.train_centroids(x, 8, 1)
    ids, sims = sd.assign(x, c, 2)
    ids_t, sims_t = sd.assign(torch.from_numpy(x), c, 2)
    assert np.array_equal(ids, ids_t) and np.allclose(sims, sims_t, atol=1e-6)
    assert len(np.unique(ids[:, 0])) == 8
    cl, row, member, rank = entries(ids, np.random.default_rng(1).permutation(len(x)))
    a, b = (sd.search_candidates(v, cl, member, row, rank, 0.95, 2, rows=row, block_cells=8192)
            for v in (x, torch.from_numpy(x)))
    pairs = {(int(row[lo]), int(row[hi])) for lo, hi in zip(a.lo, a.hi, strict=True)}
    assert pairs == {(int(row[lo]), int(row[hi])) for lo, hi in zip(b.lo, b.hi, strict=True)} and len(pairs) >= 60
    assert np.array_equal(a.best_m, b.best_m) and np.allclose(a.best_sim, b.best_sim, atol=1e-6)
    assert np.array_equal(a.near, b.near) and np.array_equal(a.more, b.more)


def test_scorer_names_the_signal_table_to_read(tmp_path):
    emb, _ = planted()
    ds = write_scored(tmp_path / "ds", emb)
    assert run(ds) == 0
    want = dedup_table(ds)
    # the same embeddings under a second scorer's name, the first one's gone: --scorer reads the second
    for sub in ("signals", "_done"):
        shutil.move(ds.root / sub / "score", ds.root / sub / "dfn")
    assert run(ds, "--redo") == 2
    assert run(ds, "--scorer", "dfn", "--redo") == 0
    assert dedup_table(ds).equals(want)
    assert run(ds, "--scorer", "../score", "--redo") == 2


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
@pytest.mark.slow
def test_spark_engine_equals_local(tmp_path, monkeypatch):
    """Every phase's tasks run as Spark tasks and the exact-duplicate GROUP BY runs in Spark SQL on the driver;
    the signal tables equal the local engine's."""
    pytest.importorskip("pyspark")
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    emb, _ = planted()
    sha = [f"{i:064x}" for i in range(len(emb))]
    sha[20] = sha[30] = sha[31]
    local = write_scored(tmp_path / "local", emb, sha=sha)
    spark = write_scored(tmp_path / "spark", emb, sha=sha)
    assert run(local, "--tasks", "3") == 0
    assert run(spark, "--tasks", "3", "--engine", "spark", "--spark-master", "local[2]") == 0
    assert sorted(p.name for p in (spark.root / "_work" / "dedup" / "pairs").glob("*.edges.npy")) == \
        ["00000.edges.npy", "00001.edges.npy", "00002.edges.npy"]
    assert (spark.root / "_work" / "dedup" / "exact_edges.parquet").is_dir()  # written by Spark SQL
    assert dedup_table(local).equals(dedup_table(spark))
    got = decisions(dedup_table(spark))
    assert got[20] == got[30] == 31 and 31 not in got  # equal bytes: the best clip_score is kept


def test_dedup_of_what_real_score_wrote(tiny_model, tmp_path):
    """Tars and ledgers from the real writers, embeddings from `curate score` (tiny random-init model): the
    byte-identical image and the re-encoded copy are the only duplicates, and 1 vs 2 workers agree."""

    conf = tiny_model
    images = [color_image(i, (64, 64)) for i in range(9)]
    images += [images[2], images[5].resize((48, 48)).resize((64, 64))]  # rows 9 (same bytes), 10 (re-encoded)
    samples = [(im, f"caption {i}", "success") for i, im in enumerate(images)]
    samples.insert(4, (None, "timed out", "timeout"))
    ds = make_dataset(tmp_path / "ds", samples, shard_size=4)
    assert main(["score", str(ds.root), "--model", str(conf), "--pretrained", "none", "--no-progress",
                 "--batch-size", "4", "--device", "cpu"]) == 0
    keys = [r["key"] for r in pq.read_table(ds.ledger(ds.shards()[0])).to_pylist()] + \
        [r["key"] for s in ds.shards()[1:] for r in pq.read_table(ds.ledger(s)).to_pylist()]
    key = {i: keys[i if i < 4 else i + 1] for i in range(len(images))}  # image index -> key (row 4 failed)
    two = DatasetDir.at(tmp_path / "two")
    shutil.copytree(ds.root, two.root)
    args = ("--phash", "--phash-distance", "-1", "--threshold", "0.9999", "--keep", "first", "--device", "cpu")
    assert run(ds, *args) == 0 and run(two, *args, "--workers", "2") == 0
    t = dedup_table(ds)
    assert t.equals(dedup_table(two))
    rows = {r["key"]: r for r in t.to_pylist()}
    assert len(rows) == len(images)
    dropped = {k: (r["kept_key"], r["dup_evidence"]) for k, r in rows.items() if r["is_duplicate"]}
    assert dropped[key[9]][0] == key[2]
    assert dropped[key[10]] == (key[5], "phash") or dropped[key[10]] == (key[5], "near")
    assert set(dropped) == {key[9], key[10]}
    assert manifest.load(ds)["stages"]["dedup"]["status"] == "complete"


def test_threshold_auto_on_a_random_init_model_does_not_flag_the_pool(tiny_model, tmp_path):
    """Issue 14: a random-init model puts unrelated images close together; the calibrated threshold stays above
    every random pair of the sample, so most of the pool is kept, and the evidence is in the manifest."""

    conf = tiny_model
    images = [color_image(i, (64, 64)) for i in range(40)]
    ds = make_dataset(tmp_path / "ds", [(im, f"c {i}", "success") for i, im in enumerate(images + [images[7]])],
                      shard_size=8)
    assert main(["score", str(ds.root), "--model", str(conf), "--pretrained", "none", "--no-progress",
                 "--batch-size", "8", "--device", "cpu"]) == 0
    assert run(ds, "--threshold", "auto", "--device", "cpu") == 0
    t = dedup_table(ds)
    assert sum(t["is_duplicate"].to_pylist()) < t.num_rows / 2  # the pool is not flagged
    counts = manifest.load(ds)["stages"]["dedup"]["counts"]
    cal = counts["threshold_calibration"]
    assert counts["threshold"] == cal["threshold"] and cal["images"] == 41 and cal["copies"] == 3 * 41
    assert cal["random_pairs"] == 41 * 40 // 2 - 1  # the byte-identical pair is not a random pair
    assert cal["random_pair_share"] <= 1e-3
    assert 0 <= cal["copy_share"] <= 1 and cal["limited_by"] in ("copies", "random_pairs")
    assert run(ds, "--threshold", "often") == 2


def _cuda() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")


@pytest.mark.gpu
def test_cuda_stage_gives_the_cpu_decisions(tmp_path):
    """--device cuda (torch assignment and pair search on the GPU) against --device cpu (faiss/numpy): the same
    tables, both equal to SemDeDup's rule by brute force."""
    _cuda()
    emb, _ = planted()
    clip = np.random.default_rng(3).uniform(0.2, 0.3, len(emb))
    cpu = write_scored(tmp_path / "cpu", emb, clip=clip)
    gpu = write_scored(tmp_path / "gpu", emb, clip=clip)
    assert run(cpu, "--device", "cpu") == 0 and run(gpu, "--device", "cuda") == 0
    assert manifest.load(gpu)["stages"]["dedup"]["counts"]["device"] == "cuda"
    assert dedup_table(cpu).equals(dedup_table(gpu))  # same centroids (faiss on the driver): same everything
    want = reference(emb, clip, None)
    assert decisions(dedup_table(cpu)) == decisions(dedup_table(gpu)) == want


@pytest.mark.gpu
def test_cuda_core_equals_cpu_for_the_same_centroids():
    _cuda()
    import torch

    from curate.stages.dedup import core as sd

    x = with_near_copies(2000, 200, seed=6)
    c = sd.train_centroids(x, 16, 0)
    ids_c, sims_c = sd.assign(x, c, 2)
    ids_g, sims_g = sd.assign(x, c, 2, device="cuda")
    assert np.array_equal(ids_c, ids_g) and np.allclose(sims_c, sims_g, atol=1e-5)
    cl, rows, member, rank = entries(ids_c, np.random.default_rng(6).permutation(len(x)))
    hc = sd.search_candidates(x, cl, member, rows, rank, 0.95, 4, rows=rows)
    hg = sd.search_candidates(torch.from_numpy(x).cuda(), cl, member, rows, rank, 0.95, 4, device="cuda", rows=rows)
    pc_ = sorted(zip(hc.lo.tolist(), hc.hi.tolist(), strict=True))
    assert pc_ == sorted(zip(hg.lo.tolist(), hg.hi.tolist(), strict=True)) and len(pc_) >= 200
    assert np.array_equal(hc.best_m, hg.best_m) and np.allclose(hc.best_sim, hg.best_sim, atol=1e-5)


def entries(ids: np.ndarray, row_rank: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The stage's entries from assign()'s (n, probes) cluster ids: (cluster, row, member, rank) per entry, sorted
    by cluster and then row; a row's first probe is its member entry; rank is its row's `row_rank`."""
    p = ids.shape[1]
    o = np.argsort(ids.reshape(-1), kind="stable")
    row = (o // p).astype(np.int64)
    return ids.reshape(-1)[o], row, (o % p) == 0, np.asarray(row_rank)[row]


def cluster_pairs(x: np.ndarray, cluster: np.ndarray, member: np.ndarray, row: np.ndarray, threshold: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Brute force over entries sorted by cluster: every (query entry, member entry) pair of one cluster and two
    rows at cosine >= threshold, and each entry's best member of another row (the first at the maximum, -1 if
    none) with that cosine (-inf if none)."""
    best_sim, best_m = np.full(len(row), -np.inf, np.float32), np.full(len(row), -1, np.int64)
    qs, ms = [], []
    for c in np.unique(cluster):
        ent = np.flatnonzero(cluster == c)
        mem = ent[member[ent]]
        if len(mem) == 0:
            continue
        sim = np.asarray(x[row[ent]], np.float32) @ np.asarray(x[row[mem]], np.float32).T
        sim[row[ent][:, None] == row[mem][None, :]] = -np.inf
        top = sim.argmax(axis=1)
        best_sim[ent] = sim[np.arange(len(ent)), top]
        best_m[ent] = np.where(np.isfinite(best_sim[ent]), mem[top], -1)
        r, k = np.nonzero(sim >= threshold)
        qs.append(ent[r])
        ms.append(mem[k])
    return np.concatenate(qs), np.concatenate(ms), best_sim, best_m


def heavy(n: int = 400, seed: int = 4) -> tuple[np.ndarray, list[str], np.ndarray]:
    """A placeholder behind 60 keys (one sha256, one embedding), a near copy of it with a better score than any
    copy, and a crowd of 40 look-alikes of one picture (cosine 0.96..0.995 to it, so most of them have far more
    partners above 0.95 than --pairs-per-row 4), among random rows."""
    rng = np.random.default_rng(seed)
    emb = unit(rng.standard_normal((n, D)))
    sha = [f"{i:064x}" for i in range(n)]
    clip = rng.uniform(0.2, 0.3, n)
    copies = list(range(10, 70))
    emb[copies] = emb[10]
    for i in copies:
        sha[i] = sha[10]
    emb[300] = near_copy(emb[10], 0.97, rng)
    clip[300] = 0.35
    for i in range(100, 140):
        emb[i] = near_copy(emb[100], rng.uniform(0.96, 0.995), rng)
    return emb, sha, clip


def test_heavy_groups_collapse_and_bounded_pairs_give_the_brute_force_rule(tmp_path):
    emb, sha, clip = heavy()
    ds = write_scored(tmp_path / "ds", emb, clip=clip, sha=sha)
    assert run(ds, "--pairs-per-row", "4", "--tasks", "3") == 0
    t = dedup_table(ds)
    assert decisions(t) == reference(emb, clip, sha)
    rows = {r["key"]: r for r in t.to_pylist()}
    # the representative (best score among the copies) is dropped by the better near copy: every copy follows it
    rep = max(range(10, 70), key=lambda i: (clip[i], -i))
    assert rows[key_of(rep)]["kept_key"] == key_of(300) and rows[key_of(rep)]["dup_evidence"] == "near"
    for i in range(10, 70):
        assert rows[key_of(i)]["exact_dup"] and rows[key_of(i)]["kept_key"] == key_of(300)
    # the copies never reached the pair search, and no row has more than 4 partners in a pair task's output
    wd = ds.root / "_work" / "dedup"
    keys = {key_of(i).encode() for i in range(10, 70) if i != rep}
    for f in sorted((wd / "pairs").glob("*.edges.npy")):
        e = np.load(f)
        assert not keys & set(e["lo_key"]) and not keys & set(e["hi_key"])
        assert len(e) == 0 or np.bincount(np.unique(e["lo_uid"], return_inverse=True)[1]).max() <= 4
    counts = manifest.load(ds)["stages"]["dedup"]["counts"]
    assert counts["exact_duplicates"] == 60 and counts["drops_by_evidence"]["exact"] == 0
    # without the near copy the representative is kept and the other 59 are its exact duplicates
    clip2 = clip.copy()
    clip2[300] = 0.0
    emb2 = emb.copy()
    emb2[300] = unit(np.random.default_rng(9).standard_normal(D))
    ds2 = write_scored(tmp_path / "ds2", emb2, clip=clip2, sha=sha)
    assert run(ds2, "--pairs-per-row", "4") == 0
    t2 = dedup_table(ds2)
    assert decisions(t2) == reference(emb2, clip2, sha)
    rows2 = {r["key"]: r for r in t2.to_pylist()}
    assert sum(rows2[key_of(i)]["dup_evidence"] == "exact" and rows2[key_of(i)]["kept_key"] == key_of(rep)
               for i in range(10, 70)) == 59


def test_bounded_pair_search_is_the_lowest_ranked_partners_of_every_pair():
    """search_candidates against every pair a brute-force search finds: per row, exactly the `per_row`
    highest-priority partners above the threshold among all its pairs (both directions of a block), on numpy and
    torch (CPU)."""
    import torch

    from curate.stages.dedup import core as sd

    emb, _, _ = heavy(350, seed=6)
    x = np.asarray(emb, np.float32)
    rng = np.random.default_rng(0)
    n = len(x)
    ids, _ = sd.assign(x, x[rng.choice(n, 6, replace=False)], 2)
    prio_rank = rng.permutation(n)  # distinct ranks per row
    cl, row, member, rank = entries(ids, prio_rank)
    q, m, best_sim, best_m = cluster_pairs(x, cl, member, row, 0.95)
    a, b = row[q], row[m]
    lo, hi = np.where(prio_rank[a] > prio_rank[b], a, b), np.where(prio_rank[a] > prio_rank[b], b, a)
    want = {}
    for r in np.unique(lo):
        partners = sorted(set(hi[lo == r].tolist()), key=lambda h: prio_rank[h])
        want[int(r)] = partners[:3]
    for vecs, device in ((x, "cpu"), (torch.from_numpy(x), "cpu")):
        c = sd.search_candidates(vecs, cl, member, row, rank, 0.95, 3, device=device, rows=row, block_cells=4096)
        got: dict[int, list[int]] = {}
        for lo_e, hi_e in zip(row[c.lo].tolist(), row[c.hi].tolist(), strict=True):
            got.setdefault(lo_e, []).append(hi_e)
        got = {r: sorted(set(v), key=lambda h: prio_rank[h])[:3] for r, v in got.items()}
        assert got == want and len(want) > 30
        assert max(len(v) for v in got.values()) <= 3
        assert np.array_equal(c.best_m, best_m) and np.allclose(c.best_sim, best_sim)


def test_a_row_beyond_pairs_per_row_is_counted(tmp_path):
    """x ~ h1 ~ r ~ h2 at 15 degrees apart on a circle (cosine 0.966; 30 degrees is 0.866), keep order x, h1, h2,
    r: h1 is dropped by x, h2 is kept, and r is dropped by h2, its second partner. With --pairs-per-row 1 only
    h1 is listed for r: r is kept, and the count of such rows says so."""
    rng = np.random.default_rng(2)
    emb = unit(rng.standard_normal((60, D)))
    angles = np.radians([0, 15, 45, 30])
    emb[:4] = 0
    emb[:4, 0], emb[:4, 1] = np.cos(angles), np.sin(angles)
    ds = write_scored(tmp_path / "ds", emb)
    assert run(ds, "--keep", "first", "--k", "1") == 0
    assert decisions(dedup_table(ds)) == reference(emb, np.zeros(len(emb)), None) == {1: 0, 3: 2}
    assert manifest.load(ds)["stages"]["dedup"]["counts"]["kept_beyond_pairs_per_row"] == 0
    assert run(ds, "--keep", "first", "--k", "1", "--pairs-per-row", "1", "--redo") == 0
    assert decisions(dedup_table(ds)) == {1: 0}
    assert manifest.load(ds)["stages"]["dedup"]["counts"]["kept_beyond_pairs_per_row"] == 1


def test_hub_probes_hold_every_partners_cluster():
    """A hub searches every cluster that can store a row within the threshold of it (the cone bound), so a
    crowd of near copies spread over many clusters is found whole; nothing outside the bound is needed."""
    from curate.stages.dedup import core as sd

    rng = np.random.default_rng(5)
    centroids = unit(rng.standard_normal((200, D))).astype(np.float32)
    for _ in range(20):
        x = unit(rng.standard_normal(D))
        crowd = np.stack([near_copy(x, c, rng) for c in rng.uniform(0.95, 0.999, 300)]).astype(np.float32)
        near = crowd[crowd @ x >= 0.95]
        home = np.argmax(near @ centroids.T, axis=1)  # where each is stored (its nearest centroid)
        probes = sd.hub_probes(x[None, :].astype(np.float32), centroids, 0.95, 256)[0]
        assert set(home.tolist()) <= set(probes.tolist())
        own = np.argmax(centroids @ x)
        assert probes[0] == own  # nearest first
    assert sd.hub_probes(x[None, :].astype(np.float32), centroids, 0.95, 3)[0].tolist() == \
        sd.hub_probes(x[None, :].astype(np.float32), centroids, 0.95, 256)[0][:3].tolist()


def test_npy_reader_matches_numpy_and_distinct_rows_keep_the_first(tmp_path):
    from curate.stages.dedup.phases import _distinct_rows, _save, npy

    arrays = [np.arange(7, dtype=np.int64), np.zeros(0, np.int64), np.zeros((3, 0), np.float32),
              np.array([b"a", b"bcd"], "S3"), np.ones((4, 5), np.float16),
              np.array([(1, 2.5, b"k")], [("uid", np.int64), ("prio", np.float64), ("key", "S4")])]
    for i, a in enumerate(arrays):
        _save(tmp_path / f"{i}.npy", a)
        got = npy(tmp_path / f"{i}.npy")
        assert got.dtype == a.dtype and got.shape == a.shape and np.array_equal(np.asarray(got), a)
    np.save(tmp_path / "f.npy", np.asfortranarray(np.ones((2, 3))))  # another layout: numpy's own reader
    assert np.array_equal(npy(tmp_path / "f.npy"), np.ones((2, 3)))
    rng = np.random.default_rng(2)
    base = rng.standard_normal((50, 8)).astype(np.float32)
    x = base[rng.integers(0, 50, 400)]
    _, first = np.unique(x.view(np.dtype((np.void, 32))).ravel(), return_index=True)
    want = x[np.sort(first)].copy()
    assert np.array_equal(_distinct_rows(x.copy(), chunk=7), want)
