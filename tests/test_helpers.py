"""The shared helpers: logging (-v/-q, logger names, no import-time side effects), hashing, devices."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dataset_factory import color_image, make_dataset

from curate.cli import main
from curate.hashing import file_sha256, json_digest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("helpers") / "pool"
    make_dataset(root, [(color_image(i), f"a photo of a cat {i}", "success") for i in range(4)], shard_size=2)
    meta = root.parent / "metadata.txt"
    meta.write_text("cat\nphoto\n")
    return root, meta


def _balance(capsys, pool, *flags: str) -> str:
    root, meta = pool
    capsys.readouterr()
    assert main([*flags, "balance", str(root), "--metadata", str(meta), "--no-progress", "--redo"]) == 0
    return capsys.readouterr().err


def test_verbose_shows_debug_and_quiet_hides_info(capsys, small_pool):
    default = _balance(capsys, small_pool)
    assert re.search(r" INFO curate\.runner: balance on .*: 2 task\(s\)", default)  # the module's own name
    assert " DEBUG " not in default
    verbose = _balance(capsys, small_pool, "-v")
    assert re.search(r" DEBUG curate\.cli: curate .*log level DEBUG", verbose)
    assert " INFO curate.runner" in verbose
    quiet = _balance(capsys, small_pool, "-q")
    assert " INFO " not in quiet and " DEBUG " not in quiet
    # one handler however often main() runs: each line printed once
    assert default.count("curate.runner") == 1
    assert logging.getLogger("curate").level == logging.WARNING


def test_a_library_logging_on_the_root_logger_neither_doubles_nor_shows(small_pool):
    """open_clip logs with the root `logging.info`, which would install a second handler if the root had
    none: every curate line would then print twice. Run as a plain process (pytest puts its own handlers
    on the root logger)."""
    root, meta = small_pool
    args = ["balance", str(root), "--metadata", str(meta), "--no-progress", "--redo"]
    code = ("import logging, sys\nfrom curate.cli import main\n"
            f"assert main({args!r}) == 0\n"
            "logging.info('third-party chatter')\n"  # as open_clip does, between two runs in one process
            f"assert main({args!r}) == 0\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.count("curate.runner: balance on") == 2, out.stderr  # once per run
    assert "third-party chatter" not in out.stderr and "INFO:curate" not in out.stderr


def test_every_module_logs_under_its_own_name():
    """`logging.getLogger(__name__)` everywhere: no logger named by hand, so -v/-q reach every module."""
    named = []
    for path in (ROOT / "curate").rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"getLogger\(\s*[\"']", line) and "logs.py" not in path.name:
                named.append(f"{path.relative_to(ROOT)}:{i}")
    assert named == []


def test_importing_curate_changes_no_global_state():
    """Importing every module leaves warning filters, logging, torch threads and the environment alone."""
    code = r"""
import importlib, json, logging, os, pkgutil, sys, warnings
import torch, urllib3  # third-party imports that set their own warning filters come first
before = (list(warnings.filters), logging.getLogger().handlers[:], logging.getLogger().level,
          torch.get_num_threads(), dict(os.environ))
import curate
names = [m.name for m in pkgutil.walk_packages(curate.__path__, "curate.")
         if not m.name.endswith("__main__") and ".demo.build_corpus" not in m.name]
for n in names:
    importlib.import_module(n)
after = (list(warnings.filters), logging.getLogger().handlers[:], logging.getLogger().level,
         torch.get_num_threads(), dict(os.environ))
changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
print(json.dumps({"modules": len(names), "changed": changed,
                  "curate_handlers": len(logging.getLogger("curate").handlers)}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["modules"] > 50
    assert got["changed"] == [] and got["curate_handlers"] == 0


def test_json_digest_keeps_its_encoding_and_file_sha256_follows_the_file(tmp_path):
    # the encoding is part of stored fingerprints: a change here would make existing outputs refuse to resume
    value = {"b": [1, 2], "a": "x"}
    assert json_digest(value) == hashlib.sha256(b'{"a": "x", "b": [1, 2]}').hexdigest()[:16]
    p = tmp_path / "f.bin"
    p.write_bytes(b"one")
    assert file_sha256(p) == hashlib.sha256(b"one").hexdigest()
    p.write_bytes(b"two!")  # another size: the cache must not answer for the old bytes
    assert file_sha256(p) == hashlib.sha256(b"two!").hexdigest()


def test_device_helpers_without_a_gpu(monkeypatch):
    from curate import devices
    from curate.errors import InputError

    if devices.cuda_count():
        pytest.skip("a GPU is visible; this checks the CPU-only answers")
    devices.require_cuda("cpu")
    devices.require_cuda("auto")
    with pytest.raises(InputError, match="--device cuda:1: no CUDA device"):
        devices.require_cuda("cuda:1")
    assert devices.current_device("auto") == "cpu"
    assert 1 <= devices.usable_cpus() <= (os.cpu_count() or 1)


def test_torch_settings_restores_threads_and_determinism():
    import torch

    from curate.devices import torch_settings

    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    with torch_settings(1, deterministic=not before[1]):
        assert torch.get_num_threads() == 1
        assert torch.are_deterministic_algorithms_enabled() == (not before[1])
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before


def _without_pyspark(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a Python where `import pyspark` fails (sys.modules entry None), as on an install
    without the spark extra."""
    prelude = "import sys; sys.modules['pyspark'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"})


def test_spark_engine_without_pyspark_is_a_clear_exit_2(small_pool):
    root, meta = small_pool
    before = sorted(p.name for p in root.iterdir())
    out = _without_pyspark(
        "from curate.cli import main\n"
        f"sys.exit(main(['balance', {str(root)!r}, '--metadata', {str(meta)!r}, '--engine', 'spark', "
        "'--no-progress', '--redo']))")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "--engine spark needs pyspark" in out.stderr and "curate[spark]" in out.stderr
    assert sorted(p.name for p in root.iterdir()) == before  # refused before anything was written


def test_nothing_imports_pyspark_at_import_time():
    out = _without_pyspark(
        "import importlib, pkgutil, curate\n"
        "names = [m.name for m in pkgutil.walk_packages(curate.__path__, 'curate.')]\n"
        "[importlib.import_module(n) for n in names]\n"
        "from curate.cli import main\n"
        "rc = main(['--help'])\n"
        "print('modules', len(names), 'rc', rc)")
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1].split()
    assert last[0] == "modules" and int(last[1]) > 50 and last[3] == "0"


def test_webdataset_pipeline_reads_a_real_export_with_the_safe_decoder(small_pool, tmp_path):
    import pyarrow.parquet as pq
    from PIL import Image

    from curate.io.wds import pipeline

    root, meta = small_pool
    assert main(["balance", str(root), "--metadata", str(meta), "--seed", "3", "--no-progress", "--redo"]) == 0
    out = tmp_path / "kept"
    assert main(["export", str(root), "--out", str(out), "--where", "balance_rank < 1"]) == 0
    kept = sorted(r["key"] for p in sorted((out / "ledger").glob("*.parquet")) for r in pq.read_table(p).to_pylist())
    assert 0 < len(kept) < 4
    samples = list(pipeline(out))
    assert [s["__key__"] for s in samples] == kept  # only the export's samples, in its order
    assert all(isinstance(s["image"], Image.Image) and s["image"].mode == "RGB" for s in samples)
    assert all(s["txt"].startswith("a photo of a cat") and s["json"]["key"] == s["__key__"] for s in samples)
    # the pool: every downloaded sample; keys= and where= narrow it
    everything = [s["__key__"] for s in pipeline(root, decode=False)]
    assert len(everything) == 4 and set(kept) <= set(everything)
    assert [s["__key__"] for s in pipeline(root, keys=kept[:1], decode=False)] == kept[:1]
    assert [s["__key__"] for s in pipeline(root, where=lambda s: s["__key__"] == everything[-1])] == everything[-1:]
