# The two commands of the README: `make quickstart` (set up, get data, train, evaluate) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test quickstart lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh

# One pytest worker per core (at most 4), one torch thread each; a test file stays on one worker, so
# its module fixtures (smoke checkpoints) are built once.
test: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

quickstart: setup
	$(VENV)/bin/dp quickstart

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
