# Two commands do all the set-up on a fresh machine (see README):
#   make run    create or reuse .venv, install HAL, run the main job on the CPU default
#   make test   the same set-up plus test tools and the example plugin, then lint, type check, tests
# Override PYTHON or TORCH to taste, e.g. `make test TORCH="torch==2.11.0"`.

PYTHON ?= python3
# The CPU build of torch 2.13.0 lies on this workplace's disk; an unpinned torch would pull a
# multi-GB CUDA build. The project itself accepts torch >= 2.6.
TORCH ?= torch==2.13.0
# The Triton that CUDA builds of torch 2.13 pin: the kernels are tested with what GPU users get.
TRITON ?= triton==3.7.1
VENV := .venv
BIN := $(VENV)/bin
PLUGINS := build/plugins

.PHONY: run test lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Re-install when the project's metadata changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/python -m pip install -q "$(TRITON)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

# The example third-party plugin goes into its own folder, not into .venv, so that `make run` shows
# only what a user of HAL would see; the tests put the folder on sys.path (tests/conftest.py).
$(PLUGINS)/.installed: $(VENV)/.installed examples/hal-example-plugin/pyproject.toml $(wildcard examples/hal-example-plugin/hal_example/*.py)
	rm -rf $(PLUGINS)
	$(BIN)/python -m pip install -q --no-deps --target $(PLUGINS) ./examples/hal-example-plugin
	touch $@

run: $(VENV)/.installed
	$(BIN)/hal run

lint: $(VENV)/.installed
	$(BIN)/ruff check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy

test: $(VENV)/.installed $(PLUGINS)/.installed lint typecheck
	@# pytest exits 5 when it collects no test: that is a failure here, never a silent pass.
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

bench: $(VENV)/.installed
	$(BIN)/python -m pytest bench -q --benchmark-columns=min,median,mean,stddev,rounds

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache .benchmarks
