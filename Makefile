# The two commands of the README: `make demo` serves the demo on the embedded model and gallery, `make test` runs the
# tests. Each sets up .venv first when it is missing or older than the requirements (bash setup.sh), so both work on a
# fresh clone and are quick once set up.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
READY := $(VENV)/.ready

.PHONY: demo test lint setup
demo: $(READY)
	$(PYTHON) app.py

test: $(READY)
	$(PYTHON) -m pytest -q

# ruff (lint, then the layout: `$(VENV)/bin/ruff format` fixes it) and the import contracts of pyproject.toml
lint: $(READY)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

setup: $(READY)

$(READY): setup.sh requirements.txt requirements-dev.txt pyproject.toml
	VENV=$(VENV) bash setup.sh
	touch $(READY)
