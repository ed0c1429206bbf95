# make demo  - create the virtual environment (first time), then train and evaluate a small model
# make test  - create the virtual environment (first time), then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: venv
	$(PY) demo.py

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf demo_out .pytest_cache
