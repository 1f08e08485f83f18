.PHONY: install test lint format docs
PY ?= python

install:            ## editable install with test and lint tools (install torch first)
	$(PY) -m pip install -e ".[dev]"

test:               ## the test suite, as CI runs it
	$(PY) -m pytest -q

lint:               ## ruff lint and format check, mypy type check of src/
	ruff check .
	ruff format --check .
	mypy

format:             ## apply ruff fixes and formatting
	ruff check --fix .
	ruff format .

docs:               ## regenerate the README CLI reference and the docs picture
	$(PY) docs/build.py
