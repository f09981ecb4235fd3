# Two commands matter on a fresh machine: `make demo` and `make test`. Both build the venv first.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
# extra pip arguments for torch, e.g. a CPU wheel index where the default index would bring a CUDA build
TORCH_PIP_ARGS ?=
BIN := $(VENV)/bin
# test processes (pytest-xdist): most tests wait on real processes, Redis and HTTP, so two share two cores well
TEST_WORKERS ?= 2
DEMO_DIR ?= runs/demo

.PHONY: install test lint demo bench compose-check clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(BIN)/pip install --quiet -e '.[dev]'
	# LMDeploy's pure-Python scheduler, without CUDA, for the step-map recorder tests (the GPU extra is .[lmdeploy])
	$(BIN)/pip install --quiet --no-deps lmdeploy==0.18.0 xgrammar==0.2.8 apache-tvm-ffi==0.1.11
	# DeepSpeed (ZeRO tests on CPU): an sdist whose build imports torch, so built against the torch installed above
	$(BIN)/pip install --quiet "setuptools>=70.1"
	$(BIN)/pip install --quiet --no-build-isolation deepspeed==0.19.8 hjson ninja py-cpuinfo einops msgpack
	$(BIN)/pip install --quiet mmengine-lite==0.10.7 shortuuid==1.0.13 pybase64==1.5.1 pyzmq==27.3.0 pillow psutil requests
	touch $@

install: $(BIN)/.installed

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

demo: install
	$(BIN)/gtpo demo --out $(DEMO_DIR)

# `docker compose up` for real (root; installs Docker and Compose v2 where missing; see docs/deploy.md)
compose-check: install
	bash scripts/compose_check.sh

bench: install
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
