# Two commands: `make demo` and `make test`. Both build .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, from the CPU wheel on this machine's disk (pip's find-links). Elsewhere set
# TORCH_SPEC/TORCH_INDEX, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu126 for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev,embed]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/mri demo

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

lint: venv
	$(BIN)/ruff check .

.PHONY: venv demo test test-fast lint
