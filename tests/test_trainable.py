"""open_clip's own trainer reads an export as it is: `python -m open_clip_train.main --dataset-type webdataset`
on `curated/shards/{...}.tar`, with no `--train-num-samples` (it reads sizes.json), trains one step.

open_clip_train comes with open_clip_torch's `[training]` extra (in curate's `dev` extra). Slow: it starts
the trainer in its own process (transformers and friends are imported there).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from pipeline_data import TINY

from curate.cli import main
from curate.io.atomic import read_json

pytestmark = pytest.mark.slow


def test_open_clip_trainer_trains_on_an_export_without_extra_flags(pipeline_dataset, tmp_path):
    out = tmp_path / "curated"
    assert main(["export", str(pipeline_dataset), "--out", str(out), "--policy", "dedup",
                 "--samples-per-shard", "4"]) == 0
    tars = sorted((out / "shards").glob("*.tar"))
    sizes = read_json(out / "shards" / "sizes.json")
    n = sum(sizes.values())
    assert len(tars) >= 2 and n > 4
    model = tmp_path / "tiny-model"
    model.mkdir()
    (model / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    pattern = f"{out / 'shards'}/{{{tars[0].stem}..{tars[-1].stem}}}.tar"
    logs = tmp_path / "logs"
    # one batch of every sample: one optimizer step; the trainer learns the sample count from sizes.json
    cmd = [sys.executable, "-m", "open_clip_train.main", "--dataset-type", "webdataset", "--train-data", pattern,
           "--model", f"local-dir:{model}", "--batch-size", str(n), "--epochs", "1", "--workers", "0",
           "--lr", "1e-3", "--warmup", "1", "--precision", "fp32", "--logs", str(logs), "--name", "probe",
           "--save-frequency", "1", "--seed", "0", "--log-every-n-steps", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES",)}
    env.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    log = (logs / "probe" / "out.log").read_text() if (logs / "probe" / "out.log").exists() else ""
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:], log[-3000:])
    assert "train_num_samples" not in " ".join(cmd)
    # the trainer saw every sample (from sizes.json) and took its step
    assert re.search(rf"Train Epoch: 0 \[\s*{n}/{n} \(100%\)\]", log), log[-3000:]
    assert re.search(r"Loss: [0-9.]+", log)
    assert (logs / "probe" / "checkpoints" / "epoch_1.pt").exists()
