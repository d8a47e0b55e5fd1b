# Two commands do all setup on a fresh machine (see README):
#   make demo   builds .venv, then trains a tokenizer and a small GPT on the built-in corpus, offline
#   make test   builds .venv (and llama.cpp, as a reference), then runs ruff and the whole test suite
# TORCH picks the PyTorch build: e.g. `make demo TORCH="torch --index-url https://download.pytorch.org/whl/cpu"`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LLAMACPP := $(VENV)/.llamacpp
# llama.cpp's library only: no examples, tools, tests or server, compiled for this CPU
LLAMACPP_CMAKE ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	# the book's package, as a reference in tests and benchmarks; --no-deps keeps TensorFlow and Jupyter out
	$(BIN)/python -m pip install -q --no-deps "llms-from-scratch>=1.0.19"
	touch $(STAMP)

# llama.cpp itself (llama-cpp-python), the reference that GGUF exports are tested against; it compiles on
# install, once per venv. If it cannot be built, those tests skip and say why.
$(LLAMACPP): $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMACPP_CMAKE)" \
	  $(BIN)/python -m pip install -q "llama-cpp-python>=0.3" > $(VENV)/llamacpp-build.log 2>&1 \
	  || echo "llama-cpp-python did not build; the llama.cpp tests will skip ($(VENV)/llamacpp-build.log)"
	touch $(LLAMACPP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/scratchllm demo

lint: $(STAMP)
	$(BIN)/ruff check scratchllm tests benchmarks
	$(BIN)/ruff format --check scratchllm tests benchmarks

test: $(STAMP) $(LLAMACPP)
	$(BIN)/ruff check scratchllm tests benchmarks
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
