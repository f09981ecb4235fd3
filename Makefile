# Two commands matter on a fresh machine: `make demo` and `make test`. Both build the venv first.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
# extra pip arguments for torch, e.g. a CPU wheel index where the default index would bring a CUDA build
TORCH_PIP_ARGS ?=
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo

.PHONY: install test lint demo bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/gtpo demo --out $(DEMO_DIR)

bench: install
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
