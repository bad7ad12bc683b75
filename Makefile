# The two commands of the README: `make quickstart` (set up, get data, train, evaluate) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test quickstart lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh

test: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q

quickstart: setup
	$(VENV)/bin/dp quickstart

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
