# rmserve: two commands to know, `make serve` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
# torch is installed first, as a CPU build: PyPI's Linux torch wheel is the CUDA build (several GB of
# nvidia-* wheels). TORCH_INDEX (PyTorch's CPU wheel index) is offered *next to* the indexes pip already
# uses (--extra-index-url), so a machine with its own wheels or mirror still resolves from them; pip
# prefers 2.13.0+cpu over PyPI's 2.13.0 (a local version sorts higher). An unreachable TORCH_INDEX costs a
# few seconds of warnings, not a failure. TORCH_INDEX= (empty) leaves pip's configuration alone;
# e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu128 for a CUDA 12.8 build.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# Where the fetched backbone and assembled default model live (outside the repo, reused between runs).
export RMSERVE_HOME ?= $(HOME)/.cache/rmserve

.PHONY: setup serve test lint typecheck clean

# Idempotent: creates the venv once, then (re)installs the project with its test extras.
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU build of torch first, pinned (see TORCH_INDEX above); the project's torch>=2.4 is then satisfied.
	$(BIN)/python -m pip install --quiet --retries 2 --timeout 30 "torch==$(TORCH_VERSION)" \
		$(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
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
