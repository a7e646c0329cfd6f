# The two commands of the README's quick start: `make run` (dvc repro on the embedded sample) and `make test`.
# Both set up .venv first. constraints.txt pins torch to the local CPU build (see DEVELOPERS.md).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: setup run test bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

run: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf data/docs data/embeddings data/clusters data/domains data/stats data/ingest data/tokens data/targets \
		data/bases runs/plots runs/*/log.csv runs/*/clusters.parquet runs/*/alignment.parquet
