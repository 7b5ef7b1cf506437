# vdep developer and user entry points. Every target installs what it needs into $(VENV) first.
#   make demo   train and evaluate the embedded demo on this machine's CPU
#   make test   run the test suite (unit tests, then the multi-process tests one at a time)

VENV ?= .venv
PYTHON ?= python3
# Pinned for the CPU install used by the demo and CI; on a GPU machine install your CUDA build of
# torch first (any version the package accepts) and run `make TORCH_SPEC= ...`.
TORCH_SPEC ?= torch==2.13.0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

BIN := $(VENV)/bin
STAMP := $(VENV)/.vdep-installed

.PHONY: install demo test test-unit test-distributed clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)")
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vdep demo

test: test-unit test-distributed

test-unit: $(STAMP)
	$(BIN)/python -m pytest -m "not distributed" -q

# Each test starts several ranks that share the CPU: run them one at a time.
test-distributed: $(STAMP)
	$(BIN)/python -m pytest -m distributed -q --durations=10

clean:
	rm -rf $(VENV) .cache .pytest_cache vdep-demo
