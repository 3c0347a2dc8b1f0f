# Two commands do all the set-up on a fresh machine: `make train` and `make test`.
# Each creates .venv on first use. TORCH pins the CPU build that lies on this machine's disk;
# elsewhere pip takes your platform's build of the same release (override: make TORCH=torch).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
SHARED_DATA := $(wildcard ../shared/data/tinyshakespeare.txt)
ifneq ($(SHARED_DATA),)
export NEXUS_DATA ?= $(abspath $(SHARED_DATA))
endif

.PHONY: train test lint format bench clean

$(BIN)/nexus: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,hf]"
	touch $@

train: $(BIN)/nexus
	$(BIN)/nexus train $(ARGS)

test: $(BIN)/nexus lint
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(BIN)/nexus
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/nexus
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(BIN)/nexus
	$(BIN)/python benchmarks/scan.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
