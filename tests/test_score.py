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
from curate.hashing import file_sha256
from curate.io.layout import DatasetDir

CAPTIONS = ["a red square on a blue background", "Ein Hund spielt im Park mit einem Ball",
            "IMG_1234.JPG", "a small photo of a striped cat"]


@pytest.fixture
def tiny_config(tiny_model):
    """The tiny open_clip config (tests/pipeline_data.py's TINY), one file for the session."""
    return tiny_model


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


# --- the data path: disjoint reading, the device decoder (run here on the CPU), several scorers ----------


def _loader_job(ds, shard, tiny_config, workers, decoder="cpu", chunk=4):
    from curate.models import load_model, resolve_model
    from curate.stages import score_loader as sl
    from curate.stages.score import read_ledger

    lm = load_model(resolve_model(str(tiny_config), "none"), "cpu")
    ledger = read_ledger(ds, shard)
    tar = str(ds.shard_tar(shard))
    wanted = frozenset(r["key"] for r in ledger if r["status"] == "success")
    return sl.LoaderJob(tar, sl.index_tar(tar), wanted, [r["caption"] for r in ledger], lm.preprocess,
                        lm.tokenizer, lm.image_size, decoder, chunk, workers), ledger


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_loader_workers_read_disjoint_runs_and_every_sample_once(tmp_path, tiny_config, workers):
    from curate.stages import score_loader as sl

    ds = make_dataset(tmp_path / "ds", samples(22), shard_size=30)  # one shard, 24 rows, 22 in the tar
    job, ledger = _loader_job(ds, "00000000", tiny_config, workers)
    report = sl.LoaderReport({}, [])
    seen = [m["key"] for b in sl.merged_batches(sl.open_loader(job, False), 8, report) for m in b["meta"]]
    in_tar = [r["key"] for r in ledger if r["status"] == "success"]
    assert sorted(seen) == sorted(in_tar) and len(seen) == len(set(seen))  # each sample exactly once
    runs = sorted(run for w in report.reads.values() for run in w)
    assert len(report.reads) == max(1, workers)  # every worker reported the byte runs it read
    assert all(a[1] <= b[0] for a, b in zip(runs, runs[1:], strict=False))  # no byte read twice
    index = sl.index_tar(job.tar)
    assert runs[0][0] == index[0][2] and runs[-1][1] == index[-1][3]  # ... and together they cover the tar
    assert sorted(i for i, _l, _c in report.caption_rows) == list(range(len(ledger)))  # every ledger row once


def test_split_ranges_are_disjoint_contiguous_and_complete():
    from curate.stages.score_loader import split_ranges

    for n in (0, 1, 5, 64, 101):
        for parts in (1, 2, 3, 8):
            rs = split_ranges(n, parts)
            assert len(rs) == parts and [i for r in rs for i in r] == list(range(n))
            assert max(map(len, rs)) - min(map(len, rs)) <= 1


def png_bytes(im):
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _score_with_both_decoders(tmp_path, rows, tiny_config, shard_size):
    """The same rows as two datasets, scored on the CPU with Pillow (a) and with the device decoder (b);
    returns (a, b, shard 0's score table of a, of b)."""
    for name in ("a", "b"):
        make_dataset(tmp_path / name, rows, shard_size=shard_size)
    a, b = DatasetDir.at(tmp_path / "a"), DatasetDir.at(tmp_path / "b")
    assert score(a, tiny_config, "--device", "cpu") == 0
    assert score(b, tiny_config, "--device", "cpu", "--decoder", "device", "--loader-workers", "2") == 0
    return a, b, table(a, "00000000"), table(b, "00000000")


def test_device_decoder_on_the_cpu_matches_the_pillow_path_and_keeps_the_safety_rules(tmp_path, tiny_config):
    """--decoder device runs torchvision's decode_jpeg + tensor resize on --device; with --device cpu the
    same code runs here. Non-JPEG members take the Pillow path; the allowlist and pixel cap apply to both."""
    big = Image.new("RGB", (100, 100))
    big_jpeg = bytearray(jpeg_bytes(big))
    sof = big_jpeg.find(b"\xff\xc0")
    big_jpeg[sof + 5:sof + 9] = (20000).to_bytes(2, "big") * 2  # header says 20000x20000: a bomb
    tiff = io.BytesIO()
    big.save(tiff, format="TIFF")
    rows = [(color_image(i, (96 + 8 * i, 80)), CAPTIONS[i % 4], "success") for i in range(9)]
    rows += [(png_bytes(color_image(50)), "a png", "success"), (bytes(big_jpeg), "a bomb", "success"),
             (tiff.getvalue(), "a tiff", "success"), (color_image(51).convert("L"), "grey", "success")]
    a, b, ta, tb = _score_with_both_decoders(tmp_path, rows, tiny_config, shard_size=20)
    reasons = {r["key"][-2:]: r["skip_reason"] for r in tb}
    assert reasons["10"] == "decompression_bomb" and reasons["11"] == "format_not_allowed"
    assert [r["skip_reason"] for r in ta] == [r["skip_reason"] for r in tb]
    assert [(r["width"], r["height"]) for r in ta] == [(r["width"], r["height"]) for r in tb]
    ea = np.load(a.signals("score", "00000000", ".img_emb.npy")).astype(np.float32)
    eb = np.load(b.signals("score", "00000000", ".img_emb.npy")).astype(np.float32)
    assert ea.shape == eb.shape == (11, 32)
    assert (ea * eb).sum(1).min() > 0.99  # another resampler, the same images
    diffs = [abs(x["clip_score"] - y["clip_score"]) for x, y in zip(ta, tb, strict=True) if x["scored"]]
    assert max(diffs) < 0.02
    st = json.loads(ds_stats(b))
    assert st["decoder"] == "device" and st["decoded_on_device"] == 10  # 9 colour JPEGs + 1 greyscale
    assert json.loads(ds_stats(a))["decoder"] == "cpu"


def ds_stats(ds):
    return ds.stats("score", "00000000").read_text()


def test_two_scorers_coexist_each_with_its_own_fingerprint(tmp_path, tiny_config, capsys):
    ds = make_dataset(tmp_path / "ds", samples(6), shard_size=4)
    assert score(ds, tiny_config) == 0
    first = np.load(ds.signals("score", "00000000", ".img_emb.npy"))
    mtime = os.stat(ds.signals("score", "00000000")).st_mtime_ns
    # a second model (another config: bf16) under another name: no --redo, the first stays untouched
    assert score(ds, tiny_config, "--name", "second", "--precision", "bf16", "--save-text-embeddings") == 0
    assert ds.done_shards("second") == ds.done_shards("score") == ["00000000", "00000001"]
    assert os.stat(ds.signals("score", "00000000")).st_mtime_ns == mtime
    assert np.array_equal(np.load(ds.signals("score", "00000000", ".img_emb.npy")), first)
    assert ds.signals("second", "00000000", ".txt_emb.npy").exists()
    man = json.loads(ds.manifest.read_text())["stages"]
    assert man["second"]["fingerprint"] != man["score"]["fingerprint"]
    assert man["second"]["inputs"]["scorer"] == "second" and man["second"]["config"]["name"] == "second"
    from curate.stages.score import scorers

    assert scorers(ds) == ["score", "second"]
    # each resumes against its own fingerprint; each refuses another config under its own name
    capsys.readouterr()
    assert score(ds, tiny_config, "--name", "second", "--precision", "bf16", "--save-text-embeddings") == 0
    assert "0 shard(s) done, 2 already done" in capsys.readouterr().err
    assert score(ds, tiny_config, "--name", "second") == 2
    # --redo of one scorer leaves the other's files alone
    assert score(ds, tiny_config, "--name", "second", "--redo") == 0
    assert os.stat(ds.signals("score", "00000000")).st_mtime_ns == mtime


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "Upper", "dedup", "download", "1abc", "x" * 41, "a-b"])
def test_a_bad_scorer_name_exits_2(tmp_path, tiny_config, capsys, bad):
    ds = make_dataset(tmp_path / "ds", samples(2), shard_size=4)
    assert score(ds, tiny_config, "--name", bad) == 2
    assert "--name" in capsys.readouterr().err
    assert not (ds.root / "signals").exists()


def test_device_assignment_is_a_pure_function_of_scheduler_facts():
    from curate.devices import pick_device, spark_task_gpus
    from curate.errors import InputError

    assert pick_device("auto", cuda_count=0) == "cpu"
    assert pick_device("cpu", cuda_count=4) == "cpu"
    assert pick_device("cuda:3", cuda_count=4) == "cuda:3"
    assert pick_device("auto", cuda_count=2) == "cuda:0"
    # local engine: pool worker k (1-based) takes GPU (k-1) mod count
    assert [pick_device("cuda", cuda_count=4, worker_index=k) for k in (1, 2, 3, 4, 5)] == \
        ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0"]
    # Spark: the task's assigned address wins over the pool index
    assert pick_device("cuda", cuda_count=4, task_gpus=["2"], worker_index=1) == "cuda:2"
    # a physical address behind CUDA_VISIBLE_DEVICES is mapped to torch's numbering
    assert pick_device("cuda", cuda_count=2, task_gpus=["6"], visible=["5", "6"]) == "cuda:1"
    with pytest.raises(InputError, match="torch sees 2"):
        pick_device("cuda", cuda_count=2, task_gpus=["3"])
    with pytest.raises(InputError, match="no CUDA device"):
        pick_device("cuda", cuda_count=0)

    from curate.engines import EngineSpec
    from curate.runner import with_workers
    from curate.stages.score import STAGE, ScoreConfig

    def workers(device, given, gpus, engine="local"):
        return with_workers(EngineSpec(engine, given), STAGE.resources(ScoreConfig(device=device)), gpus).workers

    assert workers("cuda", None, 4) == 4 and workers("auto", None, 8) == 8
    assert workers("cuda", 2, 4) == 2  # --workers given: the user decides
    assert workers("cuda:1", None, 4) == 1 and workers("cpu", None, 4) == 1
    assert workers("cuda", None, 1) == 1 and workers("auto", None, 0) == 1
    assert workers("cuda", None, 4, "spark") == 1  # Spark places tasks on GPUs itself

    class Info:  # the shape of pyspark.resource.ResourceInformation: a name and addresses
        def __init__(self, addresses):
            self.name, self.addresses = "gpu", addresses

    assert spark_task_gpus({"gpu": Info(["1"])}) == ["1"] and spark_task_gpus({}) == []


def test_background_keeps_order_and_reraises_in_the_consumer():
    from curate.stages.score_loader import background

    assert list(background(iter(range(50)), depth=2)) == list(range(50))

    def boom():
        yield 1
        raise ValueError("bad batch")

    got = []
    with pytest.raises(ValueError, match="bad batch"):
        for x in background(boom()):
            got.append(x)
    assert got == [1]
    it = background(iter(range(1000)), depth=2)  # a consumer that stops early does not hang the thread
    assert next(it) == 0
    it.close()


def test_tar_index_fast_path_equals_tarfile_and_refuses_what_the_reader_refuses(tmp_path):
    import tarfile

    from curate.errors import ShardError
    from curate.io import shards as sl

    ds = make_dataset(tmp_path / "ds", samples(9), shard_size=20)
    tar = str(ds.shard_tar("00000000"))
    assert sl._ustar_members(tar) == sl._tarfile_members(tar)
    assert [e[0] for e in sl.index_tar(tar)] == [r["key"] for r in table_keys(ds)]

    def write(name, members):
        path = tmp_path / name
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
            for m, data in members:
                info = tarfile.TarInfo(m)
                if data is None:
                    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                else:
                    info.size = len(data)
                t.addfile(info, io.BytesIO(data) if data is not None else None)
        return str(path)

    long = write("long.tar", [("d" * 120 + "/k1.txt", b"a"), ("d" * 120 + "/k1.jpg", b"bb"), ("k2.txt", b"c")])
    assert sl._ustar_members(long) is None  # PAX long names: tarfile reads them
    assert [(k, [m[0] for m in ms]) for k, ms, _a, _b in sl.index_tar(long)] == [("k1", ["txt", "jpg"]),
                                                                                    ("k2", ["txt"])]
    with pytest.raises(ShardError, match="not a regular file"):
        sl.index_tar(write("link.tar", [("k1.txt", b"a"), ("k1.jpg", None)]))
    with pytest.raises(ShardError, match="unsafe name"):
        sl.index_tar(write("dots.tar", [("../k1.txt", b"a")]))


def table_keys(ds):
    import pyarrow.parquet as pq

    return [r for r in pq.read_table(ds.ledger("00000000"), columns=["key", "status"]).to_pylist()
            if r["status"] == "success"]


def test_a_shard_failing_inside_the_loader_workers_leaves_the_next_shards_intact(tmp_path, tiny_config, capsys):
    """A bad member found by a persistent loader worker fails that shard only; the pool restarts."""
    rows = [(color_image(i), CAPTIONS[i % 4], "success") for i in range(12)]
    clean = make_dataset(tmp_path / "clean", rows, shard_size=4)
    bad = make_dataset(tmp_path / "bad", rows, shard_size=4)
    tar = bad.shard_tar("00000001")
    data = tar.read_bytes()
    i = data.index(b'{"attempts"')  # the first sample's .json member: same length, no longer JSON
    tar.write_bytes(data[:i] + b"!" + data[i + 1:])
    assert score(clean, tiny_config, "--loader-workers", "2") == 0
    assert score(bad, tiny_config, "--loader-workers", "2") == 3
    assert "is not valid JSON" in capsys.readouterr().err
    assert bad.done_shards("score") == ["00000000", "00000002"]
    for s in ("00000000", "00000002"):
        assert np.array_equal(np.load(bad.signals("score", s, ".img_emb.npy")),
                              np.load(clean.signals("score", s, ".img_emb.npy")))


@pytest.mark.spark
def test_spark_engine_scores_like_the_local_engine(tmp_path, tiny_config, monkeypatch):
    """Tasks re-enter through the Spark engine (which publishes each task's GPUs, none here) and their
    persistent loader workers live inside Spark's reused Python workers."""
    pytest.importorskip("pyspark")
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    rows = [(color_image(i), CAPTIONS[i % 4], "success") for i in range(10)]
    local = make_dataset(tmp_path / "local", rows, shard_size=4)
    spark = make_dataset(tmp_path / "spark", rows, shard_size=4)
    assert score(local, tiny_config) == 0
    assert score(spark, tiny_config, "--engine", "spark", "--spark-master", "local[2]") == 0
    for s in local.shards():
        assert np.array_equal(np.load(spark.signals("score", s, ".img_emb.npy")),
                              np.load(local.signals("score", s, ".img_emb.npy")))
        assert table(spark, s) == table(local, s)


def test_only_complete_baseline_jpegs_go_to_the_device_decoder():
    from curate.stages.score_loader import device_jpeg_size

    im = color_image(1, (40, 30))
    full = jpeg_bytes(im)
    assert device_jpeg_size(full) == (40, 30) and device_jpeg_size(full + b"\0\0") == (40, 30)
    assert device_jpeg_size(full[:-40]) is None  # cut short: the CPU path decides (decode_error)
    assert device_jpeg_size(png_bytes(im)) is None
    prog = io.BytesIO()
    im.save(prog, format="JPEG", progressive=True)
    cmyk = io.BytesIO()
    im.convert("CMYK").save(cmyk, format="JPEG")
    assert device_jpeg_size(prog.getvalue()) is None and device_jpeg_size(cmyk.getvalue()) is None
    assert device_jpeg_size(jpeg_bytes(im.convert("L"))) == (40, 30)


def refused_by_the_decoder_jpegs() -> list[bytes]:
    """JPEGs whose headers pass the device path's checks (complete, baseline, RGB, small) but whose data
    torchvision's decode_jpeg refuses: no scan at all, and an impossible Huffman table."""
    good = jpeg_bytes(color_image(7, (64, 48)))
    sos, dht = good.find(b"\xff\xda"), good.find(b"\xff\xc4")
    no_scan = good[:sos] + b"\xff\xd9"
    bad_dht = bytearray(good)
    bad_dht[dht + 5:dht + 21] = bytes([255] * 16)
    return [no_scan, bytes(bad_dht)]


def test_a_jpeg_the_device_decoder_refuses_falls_back_to_the_cpu_rules(tmp_path, tiny_config):
    """nvjpeg's fallback, run here with the same code on the CPU: a batch call that fails is retried image by
    image, each image it cannot decode goes to the Pillow path, which gives the CPU path's skip reason."""
    from curate.stages import score_loader as sl

    refused = refused_by_the_decoder_jpegs()
    good = jpeg_bytes(color_image(3, (64, 48)))
    assert all(sl.device_jpeg_size(b) == (64, 48) for b in refused)  # they do reach the device decoder
    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in (good, refused[0], good, refused[1])]
    out = sl.decode_jpegs(datas, [64 * 48] * 4, "cpu")
    assert [o is None for o in out] == [False, True, False, True]
    assert tuple(out[0].shape) == (3, 48, 64) and torch.equal(out[0], out[2])

    rows = [(color_image(i, (64, 48)), CAPTIONS[i % 4], "success") for i in range(6)]
    rows[1] = (refused[0], "no scan", "success")
    rows[4] = (refused[1], "bad huffman table", "success")
    a, b, ta, tb = _score_with_both_decoders(tmp_path, rows, tiny_config, shard_size=10)
    assert [r["skip_reason"] for r in tb] == [r["skip_reason"] for r in ta]
    assert [r["skip_reason"] for r in tb] == [None, "decode_error", None, None, "decode_error", None]
    st = json.loads(ds_stats(b))
    assert st["decoder"] == "device" and st["decoded_on_device"] == 4  # the refused two are not counted


def test_batch_size_and_loader_workers_follow_the_device():
    from curate.stages.score import auto_batch_size, auto_loader_workers, batch_size_for, loader_workers_for

    assert auto_batch_size(0, "cpu") == batch_size_for(None) == 256 and auto_batch_size(96, "cuda:0") == 96
    # H100/H200/A100-80G, A100-40G: 1024; 24 GB cards: 512; 8-12 GB cards: 256
    assert [batch_size_for(g) for g in (79.2, 139.8, 39.4, 23.6, 11.0)] == [1024, 1024, 512, 512, 256]
    assert auto_loader_workers(-1, "cpu") == 1 and auto_loader_workers(3, "cuda") == 3
    # a GPU task's share of the cores minus the task process and the pin-memory thread, 1..8
    assert [loader_workers_for(c, g) for c, g in ((16, 1), (16, 2), (10, 1), (2, 1), (128, 8), (0, 0))] == \
        [8, 6, 8, 1, 8, 1]
