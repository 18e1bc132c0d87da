# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv with the exact versions of
# requirements.lock (pyproject.toml states ranges; the lock is what these commands install and CI tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test demo lint clean lock test-latest test-oldest

$(STAMP): pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: this version's CPU wheel lies on the machine's disk; an unpinned torch pulls CUDA.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[dev]'
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

# Rewrite requirements.lock from .venv (after a deliberate upgrade there, and a passing make test).
lock: setup
	{ sed -n '1,2p' requirements.lock; $(BIN)/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

# The newest versions pyproject.toml allows (torch stays at the CPU wheel), in their own venv: not run by CI.
test-latest:
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q torch==2.13.0
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	.venv-latest/bin/python -m pytest -q -k 'not installed_versions_are_the_locked'

# The lower bounds of pyproject.toml, in their own venv: every core dependency but torch at its lower bound (torch
# stays at the CPU wheel: an older one is a CUDA download), the extras at the lock's versions; not run by CI.
OLDEST_PINS := import re, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
  norm = lambda n: re.sub(r"[-_.]+", "-", n).lower(); \
  lock = {norm(k): v for k, v in (s.strip().partition("==")[::2] for s in open("requirements.lock")) if v}; \
  core = [re.sub(r">=([^,]+).*", r"==\1", d) for d in p["dependencies"] if not d.startswith("torch")]; \
  names = [re.split(r"[<>=!~\[; ]", d)[0] for e in p["optional-dependencies"].values() for d in e]; \
  print(" ".join(core + [n + "==" + lock[norm(n)] for n in names if n != "kvcondense"]))

test-oldest:
	rm -rf .venv-oldest
	$(PY) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install -q --upgrade pip
	.venv-oldest/bin/python -m pip install -q torch==2.13.0
	pins="$$(.venv-oldest/bin/python -c '$(OLDEST_PINS)')" && .venv-oldest/bin/python -m pip install -q -e '.[dev]' torch==2.13.0 $$pins
	.venv-oldest/bin/python -m pip freeze | grep -iE '^(torch|transformers|peft|accelerate|safetensors|tqdm|gguf|mwparserfromhell)=='
	.venv-oldest/bin/python -m pytest -q -k 'not installed_versions_are_the_locked'

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
