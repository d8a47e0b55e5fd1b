# Two commands do all setup on a fresh machine (see README):
#   make demo   builds .venv, then trains a tokenizer and a small GPT on the built-in corpus, offline
#   make test   builds .venv, then runs ruff and the whole test suite
# TORCH picks the PyTorch build: e.g. `make demo TORCH="torch --index-url https://download.pytorch.org/whl/cpu"`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	# the book's package, as a reference in tests and benchmarks; --no-deps keeps TensorFlow and Jupyter out
	$(BIN)/python -m pip install -q --no-deps "llms-from-scratch>=1.0.19"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/scratchllm demo

lint: $(STAMP)
	$(BIN)/ruff check scratchllm tests benchmarks
	$(BIN)/ruff format --check scratchllm tests benchmarks

test: $(STAMP)
	$(BIN)/ruff check scratchllm tests benchmarks
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
