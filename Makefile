# The two commands a new user needs (README): `make demo` and `make test`. Both create the venv first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MPLBACKEND := Agg
# dvc.yaml's stage commands call `smitin`: the venv's, without asking the user to activate it
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo test lint bench clean

$(BIN)/smitin: requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH, or set PYTHON=..."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	# A fresh 3.11 venv carries setuptools 65, which cannot build an editable wheel without `wheel`; pin a modern one.
	$(BIN)/pip install -q --upgrade pip==26.3 setuptools==84.2.1
	# The lock is a complete freeze, so --no-deps: nothing is resolved again (see pyproject.toml on tinysoundfont).
	$(BIN)/pip install -q --no-deps -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	@touch $@

setup: $(BIN)/smitin

# The main job: every DVC stage on the embedded default data (render -> dataset -> ... -> register; JSB scores ->
# Coconet), promotion of the new versions through the gates, then a steered example from the champion generator
# (demo/steered_drums.wav + report) and a held-out chorale melody harmonized by the champion Coconet
# (demo/harmonized.mid, .musicxml, .wav, .png).
demo: setup
	$(BIN)/smitin refresh
	$(BIN)/smitin generate --prompt "a chorale for strings and organ" --steer drums=+10 --duration 8 \
		--out demo/steered_drums.wav
	$(BIN)/smitin harmonize --melody pipelines/data/jsb/test-000-soprano.mid --out demo/harmonized.mid

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# ruff: lint and formatting (configured in pyproject.toml); .ci/run runs it before the tests
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python benchmarks/features.py

clean:
	rm -rf $(VENV) build data demo
