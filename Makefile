# DiffSeg: `make help` lists the targets. `make train` and `make test` install into .venv on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install train test test-full test-random lint bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	@# Without a CUDA driver, take the local CPU wheel of torch first: a bare `torch`
	@# requirement would otherwise pull a multi-GB CUDA build. GPU machines keep pip's choice.
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install torch; \
	else \
		$(PY) -m pip install torch==2.13.0 || $(PY) -m pip install torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PY) -m pip install -e ".[dev,staple,sweep,slurm,odise]"
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the package with its dev extras

train: $(STAMP) ## train (then test) the default experiment on built-in synthetic data; ARGS="..." adds overrides
	$(VENV)/bin/diffseg-train experiment=medsegdiff_synthetic $(ARGS)

# -p no:randomly: a fixed test order (pytest-randomly, a dev dependency, would shuffle it); test-random shuffles.
test: $(STAMP) ## the fast test suite (no slow training runs)
	$(PY) -m pytest -p no:randomly -m "not slow" -q $(ARGS)

test-full: $(STAMP) ## every test, including the training runs that must learn
	$(PY) -m pytest -p no:randomly -q $(ARGS)

test-random: $(STAMP) ## the fast suite in a random order (pytest-randomly); SEED=N repeats an order
	@seed=$(or $(SEED),$$(python3 -c 'import random; print(random.randrange(2**32))')); \
	echo "random order, seed $$seed (make test-random SEED=$$seed repeats it)"; \
	$(PY) -m pytest -p randomly --randomly-seed=$$seed -m "not slow" -q $(ARGS)

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check diffseg_lightning tests experiments
	$(VENV)/bin/ruff format --check diffseg_lightning tests experiments

bench: $(STAMP) ## sampling speed against the released MedSegDiff protocol (reduced grid, < 10 min on 2 CPUs); ARGS="--full ..."
	$(PY) experiments/bench_sampling.py $(ARGS)

clean: ## remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun logs wandb .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
