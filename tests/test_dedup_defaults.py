"""dedup's defaults on a corpus the project has never seen (tests/planted_copies.py: random drawings with
planted exact and near copies), scored by an untrained model, which packs look-alike drawings together
the way a small filter model does: the pixel check keeps the flags to the copies, and dedup warns when
the embeddings alone flag far more than the byte-identical copies suggest."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dataset_factory import make_dataset
from pipeline_data import score_args
from planted_copies import planted_corpus, scores

from curate.cli import main
from curate.io import manifest
from curate.io.layout import DatasetDir
from curate.io.tables import write_table
from curate.stages.dedup import DEFAULT_PHASH_DISTANCE, DedupConfig


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_model):
    """The planted corpus as a downloaded (ledger sha256 included, as download writes it) and scored dataset."""
    images, truth, kinds = planted_corpus()
    root = tmp_path_factory.mktemp("planted") / "ds"
    ds = make_dataset(root, [(img, f"a drawing, number {i}", "success") for i, img in enumerate(images)],
                      shard_size=100)
    for f in ds.ledger_files():
        t = pq.read_table(f)
        sha = [hashlib.sha256(images[r]).hexdigest() for r in t["row"].to_pylist()]
        write_table(f, t.set_column(t.schema.get_field_index("sha256"), "sha256", pa.array(sha, pa.string())))
    assert main(score_args(root, tiny_model)) == 0
    return {"root": root, "truth": truth, "kinds": kinds}


def flagged_rows(root) -> set[int]:
    """The corpus rows dedup flagged (is_duplicate), by the ledger's row number."""
    ds = DatasetDir.at(root)
    row_of = {r["key"]: r["row"] for f in ds.ledger_files() for r in pq.read_table(f, columns=["key", "row"]).to_pylist()}
    return {row_of[r["key"]] for f in ds.signal_files("dedup")
            for r in pq.read_table(f, columns=["key", "is_duplicate"]).to_pylist() if r["is_duplicate"]}


def test_defaults_confirm_near_pairs_by_pixels():
    assert DedupConfig().phash and DedupConfig().phash_distance == DEFAULT_PHASH_DISTANCE
    assert DedupConfig(phash=False).phash_distance == -1  # no pHashes, no pixel check
    assert DedupConfig(phash_distance=-1).phash_distance == -1  # asked for: no check


def test_default_dedup_on_an_unseen_corpus_flags_the_copies(planted, tmp_path, capsys):
    from helpers import copy_dataset

    ds = copy_dataset(planted["root"], tmp_path / "default")
    assert main(["dedup", str(ds), "--no-progress", "--device", "cpu"]) == 0
    s = scores(flagged_rows(ds), planted["truth"])
    assert s["precision"] >= 0.8 and s["recall"] >= 0.5, s
    assert s["flagged_share"] <= 1.5 * s["planted_share"], s
    counts = manifest.load(DatasetDir.at(ds))["stages"]["dedup"]["counts"]
    assert "overflag_warning" not in counts
    # the embeddings alone (the pixel check turned off) flag far more than the copies, and dedup says so
    bare = copy_dataset(planted["root"], tmp_path / "bare")
    capsys.readouterr()
    assert main(["dedup", str(bare), "--no-progress", "--device", "cpu", "--no-phash"]) == 0
    s_bare = scores(flagged_rows(bare), planted["truth"])
    assert s_bare["flagged_share"] > 1.5 * s_bare["planted_share"] and s_bare["precision"] < 0.8, s_bare
    counts = manifest.load(DatasetDir.at(bare))["stages"]["dedup"]["counts"]
    assert "byte-identical copies" in counts["overflag_warning"] and "no pixel check" in counts["overflag_warning"]
    assert "flagged as duplicates" in capsys.readouterr().err
