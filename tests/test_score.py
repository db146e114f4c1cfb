"""`curate score` end to end on tiny shards with a tiny open_clip config created here (random init, 32 px)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from dataset_factory import color_image, jpeg_bytes, make_dataset
from PIL import Image

from curate.cli import main
from curate.io.layout import DatasetDir
from curate.models import file_sha256

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CAPTIONS = ["a red square on a blue background", "Ein Hund spielt im Park mit einem Ball",
            "IMG_1234.JPG", "a small photo of a striped cat"]


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "curate-test-tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def samples(n=10):
    out = [(color_image(i), CAPTIONS[i % 4], "success") for i in range(n)]
    out.insert(3, (None, "a timed out one", "timeout"))
    out.insert(6, (b"\xff\xd8 this is not a jpeg", "a corrupt one", "success"))
    return out


def score(ds, cfg, *extra, pretrained="none"):
    return main(["score", str(ds.root), "--model", str(cfg), "--pretrained", pretrained, "--no-progress",
                 "--batch-size", "4", *extra])


def table(ds, shard):
    return pq.read_table(ds.signals("score", shard)).to_pylist()


def test_scores_tiny_shards_through_the_cli(tmp_path, tiny_config):
    ds = make_dataset(tmp_path / "ds", samples(), shard_size=5)
    assert score(ds, tiny_config, "--save-text-embeddings") == 0
    assert ds.done_shards("score") == ["00000000", "00000001", "00000002"]
    rows = [r for s in ds.shards() for r in table(ds, s)]
    assert len(rows) == 12  # one row per ledger row
    by_key = {r["key"]: r for r in rows}
    assert by_key["0000000000003"]["skip_reason"] == "timeout" and not by_key["0000000000003"]["scored"]
    assert by_key["0000000100001"]["skip_reason"] == "decode_error" and by_key["0000000100001"]["emb_row"] == -1
    scored = [r for r in rows if r["scored"]]
    assert len(scored) == 10 and all(r["skip_reason"] is None for r in scored)
    assert all(-1.0 <= r["clip_score"] <= 1.0 for r in scored)
    r0 = by_key["0000000000000"]
    assert (r0["width"], r0["height"], r0["orig_width"], r0["orig_height"]) == (96, 80, 96, 80)
    assert r0["aspect_ratio"] == pytest.approx(1.2) and r0["bytes"] > 0 and r0["lang"] == "en"
    assert by_key["0000000000001"]["lang"] == "de"
    assert by_key["0000000000002"]["caption_boilerplate"] and not r0["caption_boilerplate"]
    for shard in ds.shards():
        t = table(ds, shard)
        img = np.load(ds.signals("score", shard, ".img_emb.npy"))
        txt = np.load(ds.signals("score", shard, ".txt_emb.npy"))
        n_scored = sum(r["scored"] for r in t)
        assert img.dtype == np.float16 and img.shape == (n_scored, 32) and txt.shape == img.shape
        assert np.allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1.0, atol=2e-3)
        for r in t:  # clip_score is the cosine of the row-aligned embeddings
            if r["scored"]:
                cos = float(img[r["emb_row"]].astype(np.float32) @ txt[r["emb_row"]].astype(np.float32))
                assert cos == pytest.approx(r["clip_score"], abs=5e-3)
    man = json.loads(ds.manifest.read_text())["stages"]["score"]
    assert man["status"] == "complete" and man["inputs"]["model"]["source"] == "none"
    assert man["inputs"]["model"]["config_sha256"] == file_sha256(tiny_config)
    assert man["counts"]["scored"] == 10 and man["counts"]["skipped"] == {"timeout": 1, "decode_error": 1}


def test_same_shard_scored_twice_gives_the_same_numbers_and_resume_skips(tmp_path, tiny_config, capsys):
    ds = make_dataset(tmp_path / "ds", samples(6), shard_size=4)
    assert score(ds, tiny_config) == 0
    first = {s: np.load(ds.signals("score", s, ".img_emb.npy")) for s in ds.shards()}
    first_t = {s: table(ds, s) for s in ds.shards()}
    mtime = os.stat(ds.signals("score", "00000000")).st_mtime_ns
    capsys.readouterr()
    assert score(ds, tiny_config) == 0  # resume: every shard already done
    assert "0 shard(s) done, 2 already done" in capsys.readouterr().err
    assert os.stat(ds.signals("score", "00000000")).st_mtime_ns == mtime
    # a fresh computation (other DataLoader layout too) gives identical values
    assert score(ds, tiny_config, "--redo", "--loader-workers", "0") == 0
    for s in ds.shards():
        assert np.array_equal(np.load(ds.signals("score", s, ".img_emb.npy")), first[s])
        assert table(ds, s) == first_t[s]
    # engine worker processes (spawned), each with a spawned DataLoader worker: the same values
    assert score(ds, tiny_config, "--redo", "--workers", "2", "--loader-workers", "1") == 0
    for s in ds.shards():
        assert np.array_equal(np.load(ds.signals("score", s, ".img_emb.npy")), first[s])
        assert table(ds, s) == first_t[s]


def test_another_model_config_is_refused_on_resume(tmp_path, tiny_config):
    ds = make_dataset(tmp_path / "ds", samples(3), shard_size=4)
    assert score(ds, tiny_config) == 0
    assert score(ds, tiny_config, "--precision", "bf16") == 2  # fingerprint differs, no --redo


def test_shard_slice_selects_every_nth_shard(tmp_path, tiny_config):
    ds = make_dataset(tmp_path / "ds", samples(10), shard_size=3)  # 4 shards
    assert score(ds, tiny_config, "--shard-index", "1", "--num-shards", "2") == 0
    assert ds.done_shards("score") == ["00000001", "00000003"]
    assert score(ds, tiny_config, "--shard-index", "2", "--num-shards", "2") == 2


def _in_memory(cfg_path):
    import open_clip

    from curate.models import resolve_model

    resolve_model(str(cfg_path), "none")  # registers the config with open_clip
    torch.manual_seed(123)  # weights unlike the seeded random init that --pretrained none gives
    return open_clip.create_model(cfg_path.stem).eval()


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_checkpoint_roundtrip_gives_the_in_memory_embeddings(tmp_path, tiny_config, fmt):
    import open_clip
    from safetensors.torch import save_file

    model = _in_memory(tiny_config)
    ckpt = tmp_path / f"tiny.{fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    else:
        torch.save({"state_dict": model.state_dict(), "epoch": 3}, ckpt)
    images = [color_image(i) for i in range(5)]
    ds = make_dataset(tmp_path / "ds", [(im, CAPTIONS[i % 4], "success") for i, im in enumerate(images)],
                      shard_size=8)
    assert score(ds, tiny_config, "--save-text-embeddings", "--checksum", file_sha256(ckpt),
                 pretrained=str(ckpt)) == 0

    from open_clip.transform import PreprocessCfg, image_transform_v2

    pre = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    tok = open_clip.get_tokenizer(tiny_config.stem)

    x = torch.stack([pre(Image.open(io.BytesIO(jpeg_bytes(im))).convert("RGB")) for im in images])
    with torch.no_grad():
        want_img = torch.nn.functional.normalize(model.encode_image(x), dim=-1).numpy()
        want_txt = torch.nn.functional.normalize(model.encode_text(tok([CAPTIONS[i % 4] for i in range(5)])),
                                                 dim=-1).numpy()
    got_img = np.load(ds.signals("score", "00000000", ".img_emb.npy")).astype(np.float32)
    got_txt = np.load(ds.signals("score", "00000000", ".txt_emb.npy")).astype(np.float32)
    assert np.allclose(got_img, want_img, atol=2e-3) and np.allclose(got_txt, want_txt, atol=2e-3)
    want_scores = (want_img * want_txt).sum(1)
    got_scores = [r["clip_score"] for r in table(ds, "00000000")]
    assert np.allclose(got_scores, want_scores, atol=1e-4)
    man = json.loads(ds.manifest.read_text())["stages"]["score"]
    assert man["inputs"]["model"]["checkpoint_sha256"] == file_sha256(ckpt)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_a_pickle_that_would_run_code_is_refused(tmp_path, tiny_config, capsys):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _RunsCode(str(marker))}, ckpt)
    assert not marker.exists()
    ds = make_dataset(tmp_path / "ds", samples(2), shard_size=4)
    assert score(ds, tiny_config, pretrained=str(ckpt)) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()
    assert ds.done_shards("score") == []


def test_bad_model_choices_exit_2_and_say_which(tmp_path, tiny_config, capsys):
    ds = make_dataset(tmp_path / "ds", samples(2), shard_size=4)
    model = _in_memory(tiny_config)
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    cases = [
        (["--model", "No-Such-Model", "--pretrained", "none"], "--model: unknown open_clip model"),
        (["--model", str(tmp_path / "missing.json"), "--pretrained", "none"], "config file not found"),
        (["--model", str(tiny_config), "--pretrained", str(tmp_path / "nope.pt")], "checkpoint file not found"),
        (["--model", str(tiny_config), "--pretrained", str(ckpt), "--checksum", "0" * 64], "--checksum"),
        (["--model", "ViT-B-32", "--pretrained", "no_such_tag"], "neither a checkpoint file nor"),
    ]
    for args, msg in cases:
        capsys.readouterr()
        assert main(["score", str(ds.root), "--no-progress", *args]) == 2, args
        assert msg in capsys.readouterr().err, args
    assert ds.done_shards("score") == []


def test_checkpoint_for_another_architecture_exit_2(tmp_path, tiny_config, capsys):
    ds = make_dataset(tmp_path / "ds", samples(2), shard_size=4)
    ckpt = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file

    save_file({"visual.proj": torch.zeros(3, 3)}, str(ckpt))
    rc = score(ds, tiny_config, pretrained=str(ckpt))
    assert rc == 2 and "does not fit model" in capsys.readouterr().err


def test_truncated_tar_fails_the_shard_with_a_clear_message(tmp_path, tiny_config, capsys):
    ds = make_dataset(tmp_path / "ds", [(color_image(i), "a caption", "success") for i in range(8)], shard_size=4)
    tar = ds.shard_tar("00000001")
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    assert score(ds, tiny_config) == 3
    err = capsys.readouterr().err
    assert "shard 00000001 FAILED: ShardError" in err and "00000001.tar: truncated" in err
    assert ds.done_shards("score") == ["00000000"]
    assert not ds.signals("score", "00000001").exists()
    assert not ds.signals("score", "00000001", ".img_emb.npy").exists()


def test_no_downloaded_shards_is_an_input_error(tmp_path, tiny_config, capsys):
    DatasetDir.at(tmp_path / "empty").root.mkdir()
    assert main(["score", str(tmp_path / "empty"), "--model", str(tiny_config), "--pretrained", "none",
                 "--no-progress"]) == 2
    assert "no downloaded shards" in capsys.readouterr().err
