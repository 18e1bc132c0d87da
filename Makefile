# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv with the pinned dependencies.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test demo lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: this version's CPU wheel lies on the machine's disk; an unpinned torch pulls CUDA.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/kvcondense demo

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

clean:
	rm -rf $(VENV) runs .pytest_cache

# The kvpress peer runner's own venv (benchmarks/peers/kvpress/README.md): kvpress 0.5.5 needs transformers<5.3.
PEERS_DIR := benchmarks/peers/kvpress
PEERS_VENV ?= $(PEERS_DIR)/.venv
PEERS_STAMP := $(PEERS_VENV)/.installed-stamp
.PHONY: peers

$(PEERS_STAMP): $(PEERS_DIR)/requirements.txt
	$(PY) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install -q torch==2.13.0
	$(PEERS_VENV)/bin/python -m pip install -q -r $(PEERS_DIR)/requirements.txt
	touch $(PEERS_STAMP)

peers: $(PEERS_STAMP)
