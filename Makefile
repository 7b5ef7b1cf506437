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

.PHONY: install demo test test-unit test-distributed lint check-torch clean

# Every pip call runs under a constraints file that names the pinned torch: a resolver (pip 26.x did)
# would otherwise replace the CPU build with a newer CUDA one (~4 GB) while installing the extras.
CONSTRAINTS := $(VENV)/torch-constraint.txt
# Fails the install when the venv's torch is not the pinned build: the version asked for, and a CPU build
# unless TORCH_SPEC is emptied for a CUDA machine.
define TORCH_PIN_CHECK
import sys, torch
wanted = sys.argv[1].split("==")[-1]
if torch.__version__.split("+")[0] != wanted or torch.version.cuda is not None:
    sys.exit(f"the venv holds torch {torch.__version__} (CUDA {torch.version.cuda}), not the pinned CPU build {wanted}: "
             "remove .venv and run make again")
print(f"torch {torch.__version__}: the pinned CPU build")
endef
export TORCH_PIN_CHECK
CHECK_TORCH = $(if $(TORCH_SPEC),$(BIN)/python -c "$$TORCH_PIN_CHECK" "$(TORCH_SPEC)")

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	echo "$(TORCH_SPEC)" > $(CONSTRAINTS)
	PIP_CONSTRAINT=$(CURDIR)/$(CONSTRAINTS) $(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),PIP_CONSTRAINT=$(CURDIR)/$(CONSTRAINTS) $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)")
	PIP_CONSTRAINT=$(CURDIR)/$(CONSTRAINTS) $(BIN)/python -m pip install --quiet -e ".[test]"
	$(CHECK_TORCH)
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

# The venv's torch is the pinned CPU build (nothing to check when TORCH_SPEC is emptied for a CUDA machine).
check-torch: $(STAMP)
	$(CHECK_TORCH)

# ruff's settings are in pyproject.toml; its version is pinned in the test extra.
lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .cache .pytest_cache vdep-demo
