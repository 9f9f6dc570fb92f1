# clipseg3d developer commands. `make demo` and `make test` create .venv first when it is missing.
PYTHON ?= python3
VENV ?= .venv
# Override for a CUDA machine, e.g. `make install TORCH_SPEC="torch==2.13.0" TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cu128`
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install install-dev test test-slow demo bench bench-claims clean

$(BIN)/clipseg3d: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/python -m pip install --quiet --no-deps sweeps==0.2.0
	touch $(BIN)/clipseg3d

# the test and benchmark tools (pytest, ONNX Runtime, ...) on top; the demo needs none of them
$(VENV)/.dev-installed: $(BIN)/clipseg3d
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/clipseg3d

install-dev: $(VENV)/.dev-installed

test: install-dev
	$(BIN)/python -m pytest -q

# pytest exits 5 when no test is marked slow: that is not a failure
test-slow: install-dev
	$(BIN)/python -m pytest -q -m slow || test $$? -eq 5

demo: install
	$(BIN)/clipseg3d demo

bench: install-dev
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/segment_memory.py --quick
	$(BIN)/python benchmarks/segment_speed.py --quick

# the paper's claims measured on phantoms (at most 60 min on 2 idle cores) -> BENCHMARKS.md
bench-claims: install-dev
	$(BIN)/python benchmarks/claims

clean:
	rm -rf $(VENV) build dist src/*.egg-info
