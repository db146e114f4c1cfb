"""Fresh-virtualenv installs: `pip install curate` downloads with no torch anywhere, each stage without its
extra exits 2 naming it, and `[score]` then `[all]` bring the stages they promise.

Marked `install` (deselected by default; `make test-install`, a bounded step of .ci/run): each test
installs from the package registry pip is configured with, torch included (several GB), into one
virtualenv that grows base -> [score] -> [all] as the tests run in file order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from loopback import LoopServer, jpeg
from pipeline_data import write_tiny_config

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchvision", "open_clip", "faiss", "scipy", "matplotlib", "pyspark", "cv2", "pywuffs", "webp",
         "imagehash", "fasttext", "wordfreq")
PIP_TIMEOUT = 1500


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    return env


def sh(*argv: str | Path, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=_env(), timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{argv} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


class Venv:
    def __init__(self, root: Path, src: Path):
        self.root, self.src = root, src
        self.python = root / "bin" / "python"
        self.curate = root / "bin" / "curate"

    def install(self, extras: str = "") -> None:
        sh(self.python, "-m", "pip", "install", "-q", f"{self.src}{extras}", timeout=PIP_TIMEOUT)

    def has(self, module: str) -> bool:
        return sh(self.python, "-c", f"import {module}", check=False).returncode == 0

    def run(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
        return sh(self.curate, *args, timeout=900, check=check)


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Venv:
    """A fresh virtualenv with `pip install curate` (base) from a copy of the source (pip builds in the
    source folder; the checkout stays clean)."""
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "__pycache__",
                                                             "demo-out*", "bench-out", ".whl", "tests", "bench"))
    sh(sys.executable, "-m", "venv", base / "venv")
    v = Venv(base / "venv", src)
    v.install()
    return v


@pytest.fixture(scope="module")
def web(tmp_path_factory) -> tuple[LoopServer, Path]:
    server = LoopServer()
    urls = [server.image(f"/{i}.jpg", jpeg(64 + 8 * i, 48 + 4 * i, (20 * i, 100, 200 - 10 * i))) for i in range(12)]
    path = tmp_path_factory.mktemp("urls") / "urls.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"a picture of thing {i}" for i in range(12)]}), path)
    yield server, path
    server.close()


def download(venv: Venv, web: tuple[LoopServer, Path], out: Path) -> None:
    server, urls = web
    venv.run("download", urls, "--out", out, "--preset", "laion", "--allow-host", server.endpoint,
             "--samples-per-shard", "6", "--workers", "1", "--no-progress")


def signal_rows(root: Path, stage: str) -> list[dict]:
    return [r for p in sorted((root / "signals" / stage).glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


# command -> the extra it must name, in a base install
STAGES = {
    ("score", "DS"): "score",
    ("train-probe", "--subset", "a=DS", "--eval", "DS", "--out", "OUT"): "score",
    ("balance", "DS"): "score",
    ("dedup", "DS"): "dedup",
    ("target-filter", "DS", "--target", "DS"): "dedup",
    ("index", "DS"): "search",
    ("search", "DS", "a query"): "search",
    ("serve", "DS"): "search",
}


def test_base_install_downloads_without_torch(venv, web, tmp_path):
    for module in HEAVY:
        assert not venv.has(module), f"`pip install curate` brought {module}"
    assert "--allow-host" in venv.run("download", "--help").stdout
    out = tmp_path / "ds"
    download(venv, web, out)
    ledger = pq.read_table(out / "ledger").to_pylist()
    assert len(ledger) == 12 and all(r["status"] == "success" for r in ledger)
    # export, inspect and report are base stages too
    venv.run("export", out, "--out", tmp_path / "cur", "--where", "caption <> 'a picture of thing 0'",
             "--workers", "1")
    assert pq.read_table(tmp_path / "cur" / "ledger").num_rows == 11
    assert json.loads(venv.run("inspect", tmp_path / "cur", "--json").stdout)
    venv.run("report", out, "--out", tmp_path / "r.html")
    assert (tmp_path / "r.html").stat().st_size > 1000


def test_base_install_names_the_missing_extra(venv, tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    for argv, extra in STAGES.items():
        args = [str(ds) if a == "DS" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
        res = venv.run(*args, check=False)
        assert res.returncode == 2, (argv, res.returncode, res.stderr[-2000:])
        assert f"pip install 'curate[{extra}]'" in res.stderr and "Traceback" not in res.stderr, (argv, res.stderr)
    res = venv.run("download", ds / "none.parquet", "--out", tmp_path / "x", "--engine", "spark", check=False)
    assert res.returncode == 2 and "curate[spark]" in res.stderr, res.stderr[-2000:]


def test_score_extra_scores(venv, web, tmp_path):
    venv.install("[score]")
    for module in ("torch", "open_clip", "fasttext", "wordfreq"):
        assert venv.has(module), module
    assert not venv.has("faiss")
    out = tmp_path / "ds"
    download(venv, web, out)
    model = write_tiny_config(tmp_path)
    venv.run("score", out, "--model", model, "--pretrained", "none", "--batch-size", "8", "--loader-workers", "0",
             "--no-progress")
    scores = signal_rows(out, "score")
    assert len(scores) == 12 and all(r["scored"] for r in scores)
    res = venv.run("dedup", out, check=False)
    assert res.returncode == 2 and "curate[dedup]" in res.stderr, res.stderr[-2000:]


def test_all_extra_dedups_indexes_and_has_spark(venv, web, tmp_path):
    venv.install("[all]")
    for module in ("faiss", "imagehash", "pyspark", "cv2", "webp"):
        assert venv.has(module), module
    assert not venv.has("pywuffs")  # [wuffs] builds from source: not part of [all]
    out = tmp_path / "ds"
    download(venv, web, out)
    model = write_tiny_config(tmp_path)
    venv.run("score", out, "--model", model, "--pretrained", "none", "--batch-size", "8", "--loader-workers", "0",
             "--no-progress")
    venv.run("dedup", out, "--device", "cpu", "--no-progress")
    assert len(signal_rows(out, "dedup")) == 12
    venv.run("index", out, "--no-progress")
    assert (out / "index" / "index.json").exists()
    doctor = venv.run("doctor", "--json")
    assert json.loads(doctor.stdout)
