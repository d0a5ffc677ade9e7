# s2ft developer targets. `make demo` and `make test` are the README's first two commands.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install install-dev demo test lint format

install:
	$(PIP) install -e .[gguf]

install-dev:
	$(PIP) install -e .[dev]

demo: install
	s2ft demo --output-dir s2ft-demo

test: install-dev
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check src tests bench examples
	$(PYTHON) -m ruff format --check src tests bench examples

format:
	$(PYTHON) -m ruff check --fix src tests bench examples
	$(PYTHON) -m ruff format src tests bench examples
