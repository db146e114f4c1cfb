# curate: `make test` and `make demo` each set themselves up on a fresh machine (.venv + the package).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# img2dataset (bench, adopt test) imports albumentations, which would check PyPI for updates: never
export NO_ALBUMENTATIONS_UPDATE := 1
# img2dataset's own interpreter (.venv-bench: its pins conflict with ours), for bench/download.py and the real
# img2dataset test (tests/test_adopt.py, slow): test-slow builds it first; run through make, the test fails
# without it (naming the target that builds it) instead of skipping
export CURATE_IMG2DATASET_PYTHON ?= $(CURDIR)/.venv-bench/bin/python

.PHONY: setup test test-slow test-install test-all lint demo bench bench-download bench-score bench-dedup bench-train bench-balance \
	bench-adopt bench-export gpu-wheels gpu-smoke clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[all,wuffs,dev]'
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check curate tests bench

test: setup
	$(BIN)/pytest -x --durations=10

test-slow: setup .venv-bench/.installed
	$(BIN)/pytest -x -m slow --durations=10; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

# fresh virtualenvs: `pip install .` (no torch), then [score], then [all] (torch: several GB from the registry)
test-install: setup
	$(BIN)/pytest -x -m install --durations=10 tests/test_install.py

demo: setup
	$(BIN)/curate run pipelines/demo.yaml

# img2dataset lives in its own venv: its pins conflict with ours
.venv-bench/.installed:
	$(PY) -m venv .venv-bench
	.venv-bench/bin/pip install -q img2dataset
	touch $@

bench: setup .venv-bench/.installed
	$(BIN)/python bench/download.py --img2dataset-python $(CURATE_IMG2DATASET_PYTHON)
	$(BIN)/python bench/score.py
	$(BIN)/python bench/dedup.py
	$(BIN)/python bench/train_probe.py
	$(BIN)/python bench/adopt.py
	$(BIN)/python bench/export_scale.py --rows 4000000

bench-download: setup .venv-bench/.installed
	$(BIN)/python bench/download.py --img2dataset-python $(CURATE_IMG2DATASET_PYTHON)
bench-score: setup
	$(BIN)/python bench/score.py
bench-dedup: setup
	$(BIN)/python bench/dedup.py
bench-train: setup
	$(BIN)/python bench/train_probe.py
bench-balance: setup
	$(BIN)/python bench/balance.py

bench-adopt: setup
	$(BIN)/python bench/adopt.py
bench-export: setup
	$(BIN)/python bench/export_scale.py --rows 4000000

# wheels for bench/gpu_check.sh on a GPU machine without network (Python 3.12, x86_64): what curate imports
# that the machine's image lacks; see bench/gpu_wheels.py (the tree carried there must stay under 64 MiB).
gpu-wheels: setup
	$(BIN)/python bench/gpu_wheels.py

gpu-smoke: setup
	PYTHON=$(BIN)/python bash bench/gpu_check.sh --cpu-smoke

clean:
	rm -rf demo-out bench-out artifacts .pytest_cache
