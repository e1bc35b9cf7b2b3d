# Two entry points, each sets up .venv on first use:
#   make run   - the main job: the server (Ray Serve, HTTP :8000, gRPC :9000) on the bundled demo model
#   make test  - the whole test suite (what CI runs)
# On a machine with one NVIDIA GPU only:
#   make gpu-check - installs tmp/gpu-venv (CUDA torch), runs every CUDA test (a skip fails), measures (JSON)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch pinned first: 2.13.0 is the CPU wheel on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

.PHONY: run test bench gpu-check
run: $(STAMP)
	$(BIN)/moe-cluster serve --model models/demo --num-workers 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist load

bench: $(STAMP)
	$(BIN)/python bench/engine_bench.py

gpu-check:
	bash bench/gpu_check.sh
