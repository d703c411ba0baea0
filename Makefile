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
# Python caches a module's bytecode on first import, but not where PYTHONDONTWRITEBYTECODE is set (as on the machines
# this project is built on): there every process, each Beam worker and DVC stage included, compiled Beam, scipy and
# the rest from source again (the feature workers' imports: 7.0 s -> 2.9 s with the cache; a one-clip `dataset
# build`: 9.0 s -> 4.8 s). The targets below let Python cache what they import (in the venv and the gitignored,
# dvcignored __pycache__ folders), and setup caches the modules the stages, workers and benchmarks import, for
# commands run outside make too: 17 s, where byte-compiling the whole venv took 48 s on 2 cores.
unexport PYTHONDONTWRITEBYTECODE
WARM_IMPORTS := generation.cli pipelines.features pipelines.dataset pipelines.runner models.train \
	models.evaluate_steering models.coconet_train registry apache_beam.runners.portability.fn_api_runner \
	apache_beam.runners.worker.sdk_worker_main dvc.repo mlflow torch librosa essentia.standard scipy.signal \
	sklearn.linear_model music21 mir_eval soundfile pyarrow.parquet matplotlib.pyplot safetensors.torch

comma := ,
space := $(subst ,, )
WARM := import $(subst $(space),$(comma) ,$(strip $(WARM_IMPORTS)))

.PHONY: setup demo test lint studio browser postgres bench clean

$(BIN)/smitin: requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH, or set PYTHON=..."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	# A fresh 3.11 venv carries setuptools 65, which cannot build an editable wheel without `wheel`; pin a modern one.
	$(BIN)/pip install -q --upgrade pip==26.3 setuptools==84.2.1
	# The lock is a complete freeze, so --no-deps: nothing is resolved again (see pyproject.toml on tinysoundfont).
	$(BIN)/pip install -q --no-compile --no-deps -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -c "$(WARM)" 2>/dev/null || $(BIN)/python -c "$(WARM)"  # quiet (Beam warns); on failure, say why
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
