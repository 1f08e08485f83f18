# Two commands from a fresh clone (README, "Quick start" and "Development"):
#   make demo   creates .venv if missing, installs torch and vlmo into it, answers about examples/shapes.png
#   make test   the same venv with the test extras (pinned by constraints/test.txt), then the default test run
# Both are idempotent: a stamp file in the venv records each install, so a second run goes straight to the work.
.PHONY: demo test test-slow lint format docs check-latest
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
EXTRAS := dev,app,parquet,ray,serve

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.vlmo-core: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.vlmo-test: $(VENV)/.vlmo-core constraints/test.txt pyproject.toml
	$(BIN)/python -m pip install --quiet -c constraints/test.txt -e ".[$(EXTRAS)]"
	touch $@

demo: $(VENV)/.vlmo-core   ## answer, caption, detect and segment with the built-in model (offline)
	$(BIN)/vlmo ask examples/shapes.png "what color is the circle?" --model vlmo/shapes
	$(BIN)/vlmo caption examples/shapes.png --model vlmo/shapes
	$(BIN)/vlmo detect examples/shapes.png "circle ; square ; triangle" --model vlmo/shapes
	$(BIN)/vlmo segment examples/shapes.png "circle ; square" --model vlmo/shapes

test: $(VENV)/.vlmo-test   ## the default test run (under 3 minutes on 2 cores), as CI runs it
	$(BIN)/python -m pytest -q

test-slow: $(VENV)/.vlmo-test   ## the slow tests only: torchrun, the Ray runs, the browser, the recipe
	$(BIN)/python -m pytest -q -m slow || [ $$? -eq 5 ]  # 5: no test is marked slow

lint: $(VENV)/.vlmo-test   ## ruff lint and format check, mypy type check of src/
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(VENV)/.vlmo-test   ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

docs: $(VENV)/.vlmo-core   ## regenerate the README CLI reference and the docs picture
	$(BIN)/python docs/build.py

# Moving the reference pins forward (CONTRIBUTING.md): the newest releases, no constraints, in a venv of their own.
check-latest:
	$(PY) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --upgrade pip
	.venv-latest/bin/python -m pip install --quiet $(TORCH)
	.venv-latest/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[$(EXTRAS)]"
	.venv-latest/bin/python -m pip freeze | grep -iE "^($$(grep -E '^[A-Za-z]' constraints/test.txt | cut -d= -f1 | paste -sd'|'))=="
	.venv-latest/bin/python -m pytest -q tests/test_parity.py tests/test_processing.py tests/test_lora.py tests/test_keys.py
