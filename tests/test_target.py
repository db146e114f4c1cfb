"""DataComp image-based filtering: `curate target-filter` on pools scored by `curate score` with a tiny open_clip
model, checked against a brute-force nearest-centroid computation, and selected through `curate export`."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from dataset_factory import color_image, make_dataset
from helpers import kept_keys
from pipeline_data import TINY

from curate.cli import main
from curate.io import manifest
from curate.io.layout import DatasetDir, sample_key, shard_name
from curate.stages.export import ExportConfig

N_POOL = 60
TARGET_SEEDS = [3, 17, 41]  # the target set holds copies of these pool images


def score(ds: DatasetDir, cfg, *extra) -> int:
    return main(["score", str(ds.root), "--model", str(cfg), "--pretrained", "none", "--no-progress",
                 "--batch-size", "16", *extra])


@pytest.fixture(scope="module")
def data(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("target")
    cfg = tiny_model
    samples = [(color_image(i), f"picture {i}", "success") for i in range(N_POOL)]
    samples.insert(5, (None, "timed out", "timeout"))
    samples.insert(9, (b"\xff\xd8 not a jpeg", "corrupt", "success"))  # scored row without an embedding
    pool = make_dataset(root / "pool", samples, shard_size=16)
    target = make_dataset(root / "target", [(color_image(i), f"target {i}", "success") for i in TARGET_SEEDS],
                          shard_size=2)
    assert score(pool, cfg) == 0 and score(target, cfg) == 0
    assert main(["target-filter", str(pool.root), "--target", str(target.root), "--k", "6", "--no-progress"]) == 0
    return {"pool": pool, "target": target, "cfg": cfg, "root": root}


def embeddings(ds: DatasetDir) -> dict[str, np.ndarray]:
    out = {}
    for s in ds.done_shards("score"):
        emb = np.load(ds.signals("score", s, ".img_emb.npy"))
        for r in pq.read_table(ds.signals("score", s)).to_pylist():
            if r["scored"] and r["emb_row"] >= 0:
                out[r["key"]] = emb[r["emb_row"]].astype(np.float32)
    return out


def brute_force(pool: DatasetDir, target: DatasetDir) -> tuple[dict[str, int], set[int]]:
    """Every pool embedding's nearest centroid and the clusters nearest to the target images, by a full
    matrix product (no faiss), from the centroids the stage trained."""
    c = np.load(pool.root / "_work" / "target" / "centroids.npy")
    pe = embeddings(pool)
    te = embeddings(target)
    nearest = {k: int(np.argmax(c @ v)) for k, v in pe.items()}
    chosen = {int(np.argmax(c @ v)) for v in te.values()}
    return nearest, chosen


def signals(ds: DatasetDir) -> dict[str, dict]:
    return {r["key"]: r for s in ds.done_shards("target") for r in pq.read_table(ds.signals("target", s)).to_pylist()}


def test_keeps_exactly_the_samples_of_the_clusters_nearest_to_the_target(data):
    pool, target = data["pool"], data["target"]
    nearest, chosen = brute_force(pool, target)
    assert 0 < len(chosen) < 6  # three target images cannot choose every one of six clusters
    want = sorted(k for k, c in nearest.items() if c in chosen)
    assert 0 < len(want) < len(nearest)
    sig = signals(pool)
    assert {k: r["cluster"] for k, r in sig.items() if r["cluster"] is not None} == nearest
    kept = kept_keys(ExportConfig(source=str(pool.root), policy=("datacomp-image",)))
    assert kept == want
    # the target's own images are copies of pool rows: those rows are always kept
    pos = [i + (i >= 5) + (i >= 8) for i in TARGET_SEEDS]  # after the two inserted rows
    copies = {sample_key(shard_name(p // 16), p % 16) for p in pos}
    assert copies <= set(kept)
    plan = json.loads((pool.root / "_work" / "target" / "plan.json").read_text())
    assert sorted(plan["selected"]) == sorted(chosen) and plan["target_images"] == 3
    counts = manifest.load(pool)["stages"]["target"]["counts"]
    assert counts["selected"] == len(want) and counts["clusters"] == 6 and counts["selected_clusters"] == len(chosen)


def test_rows_without_an_embedding_are_never_selected(data):
    sig = signals(data["pool"])
    no_emb = [r for r in sig.values() if r["cluster"] is None]
    assert len(no_emb) == 2 and not any(r["selected"] for r in no_emb)  # the timeout and the corrupt image


def test_composes_with_clip_top30_as_an_intersection(data):
    pool = data["pool"]
    both = kept_keys(ExportConfig(source=str(pool.root), policy=("clip-top30", "datacomp-image")))
    top = kept_keys(ExportConfig(source=str(pool.root), policy=("clip-top30",)))
    image = kept_keys(ExportConfig(source=str(pool.root), policy=("datacomp-image",)))
    assert both == sorted(set(top) & set(image))


def test_resume_and_redo_are_deterministic(data, capsys):
    pool, target = data["pool"], data["target"]
    before = signals(pool)
    args = ["target-filter", str(pool.root), "--target", str(target.root), "--k", "6", "--no-progress"]
    assert main(args) == 0 and "0 shard(s) done" in capsys.readouterr().err
    assert main([*args, "--redo"]) == 0
    assert signals(pool) == before
    assert main([*args[:-1], "--seed", "1", "--no-progress"]) == 2  # another config: refused without --redo
    assert "fingerprint" in capsys.readouterr().err


def test_target_from_another_model_exits_2(data, tmp_path, capsys):
    other_cfg = tmp_path / "other.json"
    other_cfg.write_text(json.dumps({**TINY, "embed_dim": 16}))
    other = make_dataset(tmp_path / "other", [(color_image(i), "x", "success") for i in range(3)], shard_size=4)
    assert score(other, other_cfg) == 0
    pool = data["pool"]
    assert main(["target-filter", str(pool.root), "--target", str(other.root), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--target" in err and "same model" in err
    unscored = make_dataset(tmp_path / "unscored", [(color_image(1), "x", "success")], shard_size=4)
    assert main(["target-filter", str(pool.root), "--target", str(unscored.root), "--no-progress"]) == 2
    assert "no scored shards" in capsys.readouterr().err


def test_sample_cap_trains_on_fewer_rows_and_selection_still_matches_brute_force(data, tmp_path):
    import shutil

    copy = tmp_path / "pool"
    shutil.copytree(data["pool"].root, copy)
    pool = DatasetDir.at(copy)
    assert main(["target-filter", str(copy), "--target", str(data["target"].root), "--k", "4", "--sample", "24",
                 "--redo", "--no-progress"]) == 0
    plan = json.loads((copy / "_work" / "target" / "plan.json").read_text())
    assert 4 < plan["sampled"] < 45  # about 24 of the 60 rows, drawn by key hash
    nearest, chosen = brute_force(pool, data["target"])
    kept = kept_keys(ExportConfig(source=str(copy), policy=("datacomp-image",)))
    assert kept == sorted(k for k, c in nearest.items() if c in chosen)
