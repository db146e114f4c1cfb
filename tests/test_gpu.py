"""GPU checks (`pytest -m gpu`, run by bench/gpu_check.sh on a GPU machine) and `curate doctor` (CPU).

The gpu-marked tests compare the accelerated path with the CPU path on the same shards through the CLI.
They take their device from CURATE_TEST_DEVICE (default cuda) and skip without one; with
CURATE_TEST_DEVICE=cpu (`bash bench/gpu_check.sh --cpu-smoke`) the same code runs here on the CPU,
device decoder included, so the script and the tests are exercised before a GPU ever sees them.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from dataset_factory import color_image, jpeg_bytes, make_dataset
from PIL import Image

from curate.cli import main
from curate.io.layout import DatasetDir

DEVICE = os.environ.get("CURATE_TEST_DEVICE", "cuda")
TINY = "curate-tiny"  # shipped config: 64 px ViT, random init


def need_device() -> str:
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch (set CURATE_TEST_DEVICE=cpu to run these on the CPU)")
    return DEVICE


def mixed_samples(n: int = 120) -> list:
    """JPEGs of several sizes (most one size, as download writes them), greyscale, PNG, corrupt, missing."""
    out = []
    for i in range(n):
        size = (256, 256) if i % 4 else (180 + i % 50, 140 + i % 30)
        im = color_image(i, size)
        if i % 17 == 5:
            im = im.convert("L")
        out.append((im, f"a photo of thing {i}", "success"))
    png = io.BytesIO()
    color_image(999, (120, 90)).save(png, format="PNG")
    out[7] = (png.getvalue(), "a png", "success")
    out[11] = (jpeg_bytes(color_image(3))[:200], "a cut jpeg", "success")
    out.insert(13, (None, "timed out", "timeout"))
    return out


def score(root, *extra: str) -> int:
    return main(["score", str(root), "--model", TINY, "--pretrained", "none", "--no-progress", *extra])


def tables(ds: DatasetDir, name: str = "score") -> tuple[list[dict], np.ndarray]:
    rows, embs = [], []
    for shard in ds.shards():
        rows += pq.read_table(ds.signals(name, shard)).to_pylist()
        embs.append(np.load(ds.signals(name, shard, ".img_emb.npy")).astype(np.float32))
    return rows, np.concatenate(embs)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_device_scores_equal_cpu_scores_within_half_precision(tmp_path, precision):
    dev = need_device()
    make_dataset(tmp_path / "cpu", mixed_samples(), shard_size=50)
    shutil.copytree(tmp_path / "cpu", tmp_path / "dev")
    assert score(tmp_path / "cpu", "--device", "cpu") == 0
    assert score(tmp_path / "dev", "--device", dev, "--precision", precision, "--decoder", "device",
                 "--loader-workers", "3", "--batch-size", "64") == 0
    a, b = DatasetDir.at(tmp_path / "cpu"), DatasetDir.at(tmp_path / "dev")
    (ra, ea), (rb, eb) = tables(a), tables(b)
    assert [r["key"] for r in ra] == [r["key"] for r in rb]
    assert [r["skip_reason"] for r in ra] == [r["skip_reason"] for r in rb]
    assert sum(r["scored"] for r in rb) == 119  # 121 rows: a timeout and a cut JPEG are not scored
    assert [(r["width"], r["height"]) for r in ra] == [(r["width"], r["height"]) for r in rb]
    cos = (ea * eb).sum(1)
    diffs = np.array([abs(x["clip_score"] - y["clip_score"]) for x, y in zip(ra, rb, strict=True) if x["scored"]])
    print(f"{dev} {precision}: min embedding cosine {cos.min():.4f}, max |clip diff| {diffs.max():.4f}")
    assert cos.min() > 0.98 and diffs.max() < 0.03
    counts = json.loads(b.manifest.read_text())["stages"]["score"]["counts"]
    assert counts["decoded_on_device"] >= 110  # the JPEGs took the device decoder; the PNG did not
    assert counts["decoded_on_device"] < 119


@pytest.mark.gpu
def test_device_loader_reads_each_sample_once_with_many_workers(tmp_path):
    from curate.models import load_model, resolve_model
    from curate.stages import score_loader as sl
    from curate.stages.score import read_ledger

    dev = need_device()
    ds = make_dataset(tmp_path / "ds", mixed_samples(300), shard_size=400)
    shard = ds.shards()[0]
    lm = load_model(resolve_model(TINY, "none"), dev)
    ledger = read_ledger(ds, shard)
    tar = str(ds.shard_tar(shard))
    job = sl.LoaderJob(tar, sl.index_tar(tar), frozenset(r["key"] for r in ledger if r["status"] == "success"),
                       [r["caption"] for r in ledger], lm.preprocess, lm.tokenizer, lm.image_size, "device",
                       16, 6)
    report = sl.LoaderReport({}, [])
    pre = sl.DevicePreprocess.from_model(lm.model)
    staged = sl.background((sl.stage_batch(b, dev, pre, lambda d: sl.decode_image(d, lm.preprocess, 64)[0])
                            for b in sl.merged_batches(sl.open_loader(job, dev.startswith("cuda")), 64, report)),
                           device=dev)
    keys, metas, on_device = [], [], 0
    for sb in staged:
        metas += [m["key"] for m in sb.meta]
        keys += sb.keys
        on_device += sb.on_device
        assert sb.images.device.type == torch.device(dev).type and sb.images.shape[1:] == (3, 64, 64)
    assert len(metas) == len(set(metas)) == 300  # every sample in the tar, once
    assert len(keys) == 299 and on_device >= 280
    runs = sorted(r for w in report.reads.values() for r in w)
    assert len(report.reads) == 6 and all(a[1] <= b[0] for a, b in zip(runs, runs[1:], strict=False))


def _has_device_flag(command: str) -> bool:
    from curate.cli import cli

    cmd = cli.commands.get(command)
    return cmd is not None and any("--device" in getattr(p, "opts", []) for p in cmd.params)


@pytest.mark.gpu
def test_dedup_decisions_on_the_device_equal_the_cpu_decisions(tmp_path):
    dev = need_device()
    if dev == "cpu":
        # --device cpu against --device cpu would compare the CPU path with itself; the torch code path run on
        # the CPU is tests/test_dedup.py::test_torch_path_gives_the_numpy_faiss_decisions
        pytest.skip("CURATE_TEST_DEVICE=cpu: both runs would take dedup's CPU path (see test_dedup's torch test)")
    if not _has_device_flag("dedup"):
        pytest.skip("`curate dedup` has no --device flag in this build yet (engineer dedup's GPU path)")
    for module, why in (("faiss", "the CPU reference path"), ("duckdb", "dedup's exact-duplicate SQL")):
        try:
            __import__(module)
        except ImportError:
            pytest.skip(f"{module} is not installed here ({why}); bench/gpu_wheels.py carries it when it fits")
    base = [(color_image(i % 40, (96, 80)), f"caption {i}", "success") for i in range(160)]
    make_dataset(tmp_path / "a", base, shard_size=64)
    assert score(tmp_path / "a", "--device", "cpu") == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    args = ["--threshold", "0.97", "--seed", "0", "--no-progress"]
    assert main(["dedup", str(tmp_path / "a"), "--device", "cpu", *args]) == 0
    assert main(["dedup", str(tmp_path / "b"), "--device", dev, *args]) == 0
    a, b = DatasetDir.at(tmp_path / "a"), DatasetDir.at(tmp_path / "b")
    ta = sorted((r for s in a.signal_files("dedup") for r in pq.read_table(s).to_pylist()), key=lambda r: r["key"])
    tb = sorted((r for s in b.signal_files("dedup") for r in pq.read_table(s).to_pylist()), key=lambda r: r["key"])
    assert ta and len(ta) == len(tb)
    decision = [c for c in ta[0] if c in ("keep", "kept", "dup_group", "kept_key", "is_duplicate", "drop")]
    assert decision, f"no decision column among {sorted(ta[0])}"
    assert [[r[c] for c in decision] for r in ta] == [[r[c] for c in decision] for r in tb]


# --- curate doctor (runs everywhere) ---------------------------------------------------------------------


def test_doctor_reports_each_stage_and_why(capsys):
    assert main(["doctor", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"]["version"] == torch.__version__
    assert info["torch"]["cuda_available"] == torch.cuda.is_available()
    sc = info["score"]
    if torch.cuda.is_available():
        assert sc["device"] == "cuda:0" and sc["batch_size"] >= 256 and info["torch"]["gpus"]
    else:
        assert sc["device"] == "cpu" and sc["batch_size"] == 256 and "Pillow" in sc["jpeg_decoder"]
        assert sc["jpeg_decoder_why"] and info["torch"]["why"]
    assert ("torch" in info["dedup"]["device_why"]) == torch.cuda.is_available()  # says which library and why
    faiss = info["dedup"]["faiss"]
    assert faiss["distributions"], "no package provides faiss"
    assert len(faiss["distributions"]) == 1 or "problem" in faiss  # two providers are flagged
    from curate import langid

    assert info["langid"]["sha256"] == langid.MODEL_SHA256 and info["langid"]["checksum_ok"]
    assert "pyspark" in info["spark"] and "java" in info["spark"]
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    for head in ("torch ", "score: device", "JPEG decoder", "dedup:", "language ID:", "spark:"):
        assert head in text


def test_the_gpu_extra_installs_no_second_faiss():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]

    def faiss_of(reqs: list[str]) -> set[str]:  # faiss packages, following curate[...] self-references
        out: set[str] = set()
        for r in reqs:
            if r.startswith("curate["):
                for name in r[len("curate["):r.index("]")].split(","):
                    out |= faiss_of(extras[name])
            elif r.lower().startswith("faiss"):
                out.add(r.split(">")[0].split("=")[0].split("<")[0].strip().lower())
        return out

    # faiss-gpu goes in *in place of* faiss-cpu (both provide `faiss`): the gpu extra brings no faiss of its
    # own, the base install none, and every extra that needs faiss names the same one package
    assert faiss_of(extras["gpu"]) == set() and faiss_of(meta["dependencies"]) == set()
    assert {name: faiss_of(reqs) for name, reqs in extras.items() if faiss_of(reqs)} == \
        {"dedup": {"faiss-cpu"}, "search": {"faiss-cpu"}, "all": {"faiss-cpu"}}


def test_device_decode_probe_answers_on_the_cpu():
    from curate.stages.score_loader import device_decoder_status

    ok, why = device_decoder_status("cpu")
    assert ok and "decode_jpeg" in why
    assert Image  # the probe builds its JPEG with Pillow
