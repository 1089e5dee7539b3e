# rmserve: two commands to know, `make serve` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
# Where the fetched backbone and assembled default model live (outside the repo, reused between runs).
export RMSERVE_HOME ?= $(HOME)/.cache/rmserve

.PHONY: setup serve test lint typecheck clean

# Idempotent: creates the venv once, then (re)installs the project with its test extras.
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU build of torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

serve: setup
	$(BIN)/rmserve serve --host $(HOST) --port $(PORT)

lint: setup
	$(BIN)/ruff check service models tests bench scripts
	$(BIN)/ruff format --check service models tests bench scripts

typecheck: setup
	$(BIN)/mypy service models

test: setup lint typecheck
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
