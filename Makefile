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
# Files of the locked packages written for other Python versions (setup's byte-compile skips them, see there)
NOT_FOR_PY311 := site-packages/(essentia/(essentia_extractor\.py|extractor/|weka/)|torch/testing/_internal/py312_intrinsics\.py)

.PHONY: setup demo test lint studio browser postgres bench clean

$(BIN)/smitin: requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH, or set PYTHON=..."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	# A fresh 3.11 venv carries setuptools 65, which cannot build an editable wheel without `wheel`; pin a modern one.
	$(BIN)/pip install -q --upgrade pip==26.3 setuptools==84.2.1
	# The lock is a complete freeze, so --no-deps: nothing is resolved again (see pyproject.toml on tinysoundfont).
	$(BIN)/pip install -q --no-compile --no-deps -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	# Byte-compile the installed packages once, on all cores (~36 s on 2). Python would compile a module on first
	# import and cache it, but not where PYTHONDONTWRITEBYTECODE is set (as on the machines this project is built
	# on): there every process, each Beam worker and DVC stage included, compiled Beam, scipy and the rest from
	# source again (the feature workers' imports: 7.0 s -> 2.9 s; a one-clip `dataset build`: 9.0 s -> 4.8 s). The
	# files that packages ship for other Python versions (essentia's Python 2 extractors, a torch test helper for
	# 3.12) do not compile and nothing imports them: they are skipped by name, and any other failure fails setup.
	$(BIN)/python -m compileall -q -j 0 -x '$(NOT_FOR_PY311)' $(VENV)/lib
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

test: setup browser postgres
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Debian's Chromium and chromedriver, for the studio's browser tests (installed once; apt-get needs root)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  [ "$$(id -u)" = 0 ] || { echo "the studio's browser tests need Debian's chromium and chromium-driver:" \
	    "run 'sudo make browser' once"; exit 1; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

# Debian's PostgreSQL 15, for the shared-registry tests (an `mlflow server` on PostgreSQL; installed once; apt-get
# needs root). The tests start their own throwaway cluster, so the package's own service is never started.
postgres:
	@command -v pg_ctl >/dev/null || [ -x /usr/lib/postgresql/15/bin/pg_ctl ] || { \
	  [ "$$(id -u)" = 0 ] || { echo "the shared-registry tests need Debian's postgresql: run 'sudo make postgres' once"; \
	    exit 1; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

# ruff: lint and formatting (configured in pyproject.toml); .ci/run runs it before the tests
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# the studio on http://127.0.0.1:8000 (after `make demo`, so the registry has champions to serve)
studio: setup
	$(BIN)/smitin studio

bench: setup
	$(BIN)/python benchmarks/features.py

clean:
	rm -rf $(VENV) build data demo
