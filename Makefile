# One command to install and test, one to install and run the main job.
# The virtual environment is created on first use; torch is installed pinned *before* the
# package so that pip never resolves an unpinned `torch` (which would pull the CUDA build).
# GPU users: `make install TORCH="torch --index-url <your CUDA wheel index>"`.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.lmlab-installed

.PHONY: install test test-slow lint bench speedrun clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev,hf,data,serve]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check lmlab tests benchmarks

# The main job: synthetic corpus -> tokenizer -> shards -> pretraining -> evaluation -> report card
# in runs/speedrun/ (about ten minutes on a 2-core CPU; see docs/speedrun.md).
speedrun: install
	$(PY) -m lmlab speedrun

bench: install
	$(PY) benchmarks/forward_backward.py
	$(PY) benchmarks/tokenizer.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
