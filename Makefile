# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test test-fast clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a bare torch requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	# the gpu extra (xfuser, DistVAE) installs on CPU too and keeps the pinned CPU torch: CI runs the xfuser tests
	$(BIN)/pip install -q -e '.[dev,ui,gpu,browser,lora]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python -m trident_rs.devtools.demo $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -q -ra

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
