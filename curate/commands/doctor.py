"""`curate doctor`: what each stage will use on this machine (device, GPUs, faiss build, JPEG decoder,
language model, Spark/Java) and why, so a user sees before a long run whether the GPU path is taken.

It only looks: nothing is downloaded and no dataset is touched. Each probe reports its own failure as a
finding instead of raising, so one broken piece never hides the others.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

import click

from curate import __version__, langid
from curate.devices import cuda_count, gpu_names
from curate.extras import EXTRAS, missing
from curate.hashing import file_sha256
from curate.stages.score import auto_batch_size, auto_loader_workers


def _torch() -> dict[str, Any]:
    import torch

    n = cuda_count()
    cuda = n > 0
    out: dict[str, Any] = {"version": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": cuda,
                           "gpus": gpu_names()}
    if cuda:
        out["gpu_memory_gib"] = [round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)
                                 for i in range(n)]
    else:
        out["why"] = ("torch was built without CUDA" if torch.version.cuda is None
                      else "no CUDA device visible (driver, CUDA_VISIBLE_DEVICES)")
    return out


def _score(torch_info: dict[str, Any]) -> dict[str, Any]:
    from curate.stages.score_loader import device_decoder_status

    cuda = torch_info["cuda_available"]
    device = "cuda:0" if cuda else "cpu"
    out: dict[str, Any] = {
        "device": device,
        "device_why": (f"--device auto takes the GPU; --device cuda with the local engine runs one worker per GPU "
                       f"({len(torch_info['gpus'])})" if cuda else f"--device auto: {torch_info.get('why')}"),
        "batch_size": auto_batch_size(0, device),
        "loader_workers": auto_loader_workers(-1, device),
    }
    if cuda:
        ok, why = device_decoder_status(device)
        out["jpeg_decoder"] = "nvjpeg (torchvision.io.decode_jpeg on the GPU)" if ok else "Pillow (CPU)"
        out["jpeg_decoder_why"] = why + ("" if ok else "; the CPU path is used")
    else:
        out["jpeg_decoder"] = "Pillow (CPU, in loader workers)"
        out["jpeg_decoder_why"] = "no GPU: nvjpeg needs CUDA"
    return out


def _faiss() -> dict[str, Any]:
    from importlib import metadata

    dists = sorted(set(metadata.packages_distributions().get("faiss", [])))
    out: dict[str, Any] = {"distributions": dists}
    if len(dists) > 1:
        out["problem"] = (f"{len(dists)} packages provide the 'faiss' module ({', '.join(dists)}): they overwrite "
                          f"each other's files; keep one (pip uninstall the others, then reinstall it)")
    try:
        import faiss

        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        out.update(version=getattr(faiss, "__version__", "?"), gpu_build=hasattr(faiss, "StandardGpuResources"),
                   gpus=gpus)
        out["why"] = ("dedup's CPU path uses faiss; its GPU path (--device cuda) uses torch matrix products, "
                      "so the CPU build is all curate needs")
    except Exception as e:  # noqa: BLE001 - reported, not raised
        out["problem"] = f"import faiss failed: {type(e).__name__}: {e}"
    return out


def _langid() -> dict[str, Any]:
    try:
        path = langid.model_path()
        sha = file_sha256(path)
    except Exception as e:  # noqa: BLE001
        return {"file": langid.MODEL_FILE, "problem": str(e)}
    out = {"file": str(path), "sha256": sha, "expected_sha256": langid.MODEL_SHA256,
           "checksum_ok": sha == langid.MODEL_SHA256}
    if sha != langid.MODEL_SHA256:
        out["problem"] = "checksum mismatch: score refuses this file"
    return out


def _spark() -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        from importlib import metadata

        out["pyspark"] = metadata.version("pyspark")
    except Exception:  # noqa: BLE001
        out["pyspark"] = None
        out["problem"] = "pyspark is not installed: --engine spark is unavailable (pip install 'curate[spark]')"
    home = os.environ.get("JAVA_HOME")
    java = os.path.join(home, "bin", "java") if home else shutil.which("java")
    out["java"] = java
    if java and os.path.exists(java):
        try:
            p = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=20, check=False)
            out["java_version"] = (p.stderr or p.stdout).splitlines()[0] if (p.stderr or p.stdout) else "?"
        except (OSError, subprocess.TimeoutExpired) as e:
            out["problem"] = f"java -version failed: {e}"
    else:
        out["problem"] = "no java on PATH (or JAVA_HOME): Spark needs Java 17+"
    out["gpu_scheduling"] = ("set spark.executor.resource.gpu.amount and spark.task.resource.gpu.amount; "
                             "each task then scores on the GPU Spark assigned it")
    return out


def collect() -> dict[str, Any]:
    """Every finding as JSON-able data."""
    info: dict[str, Any] = {"curate": __version__, "python": sys.version.split()[0]}
    try:
        info["torch"] = _torch()
        info["score"] = _score(info["torch"])
    except Exception as e:  # noqa: BLE001
        info["torch"] = {"problem": f"import torch failed: {type(e).__name__}: {e}"}
    cuda = bool(info["torch"].get("cuda_available"))
    info["dedup"] = {"faiss": _faiss(), "device": "cuda (torch)" if cuda else "cpu (faiss)",
                     "device_why": ("--device auto: assignment and pair search as torch matrix products on the GPU; "
                                    "k-means by faiss on the CPU, so the decisions equal a CPU run's") if cuda else
                                   ("--device auto: no GPU; k-means and assignment by faiss, pair search by numpy")}
    info["langid"] = _langid()
    info["spark"] = _spark()
    info["download"] = _download()
    info["extras"] = {name: not missing(mods) for name, mods in EXTRAS.items()}
    return info


def _download() -> dict[str, Any]:
    """download's optional fast paths (the [fast] and [wuffs] extras); Pillow does the work without them."""
    from curate.imaging import fast_decoders

    try:
        fast = fast_decoders()
    except Exception as e:  # noqa: BLE001 -- a broken optional package: say so, download falls back
        return {"problem": f"{type(e).__name__}: {e}"}
    return {"png": "Wuffs (pywuffs)" if fast["png"] else "Pillow",
            "webp": "libwebp WebPDecode (webp)" if fast["webp"] else "Pillow",
            "shrink": "box reduce + OpenCV bilinear" if fast["shrink"] else "box reduce + Pillow Hamming"}


def _lines(info: dict[str, Any]) -> list[str]:
    t, s = info["torch"], info.get("score", {})
    f, lg, sp = info["dedup"]["faiss"], info["langid"], info["spark"]
    gpus = ", ".join(t.get("gpus") or []) or "none"
    out = [f"curate {info['curate']}, python {info['python']}",
           f"torch {t.get('version')} (CUDA build {t.get('cuda_build')}): GPUs: {gpus}"
           + ("" if t.get("cuda_available") else f" -- {t.get('why', t.get('problem'))}")]
    if s:
        out += [f"score: device {s['device']} ({s['device_why']}); batch {s['batch_size']}, "
                f"loader workers {s['loader_workers']}",
                f"score: JPEG decoder {s['jpeg_decoder']} ({s['jpeg_decoder_why']})"]
    out.append(f"dedup: device {info['dedup']['device']} ({info['dedup']['device_why']}); faiss {f.get('version')} from "
               f"{', '.join(f['distributions']) or 'no package'} (GPU build: {f.get('gpu_build')})"
               + (f" -- PROBLEM: {f['problem']}" if f.get("problem") else ""))
    out.append(f"language ID: {lg.get('file')} sha256 {lg.get('sha256', '?')[:16]}... "
               + ("(checksum ok)" if lg.get("checksum_ok") else f"-- PROBLEM: {lg.get('problem')}"))
    out.append(f"spark: pyspark {sp.get('pyspark')}, java {sp.get('java_version') or sp.get('java')}"
               + (f" -- PROBLEM: {sp['problem']}" if sp.get("problem") else ""))
    d = info["download"]
    out.append(f"download: PNG {d.get('png')}, WebP {d.get('webp')}, shrink {d.get('shrink')}"
               + (f" -- PROBLEM: {d['problem']}" if d.get("problem") else ""))
    out.append("extras: " + ", ".join(f"[{k}] {'installed' if v else 'missing'}" for k, v in info["extras"].items()))
    return out


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def command(as_json: bool) -> None:
    """Show what each stage will use here (device, GPUs, faiss, JPEG decoder, language model, Spark) and why."""
    info = collect()
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        for line in _lines(info):
            click.echo(line)
