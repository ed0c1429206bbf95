# make demo  - create the virtual environment (first time), then train, evaluate and search with a small model
#              (DEMO_ARGS=--real: the real faces of ../shared/data/celeba299-ddh32 instead of drawn ones)
# make test  - create the virtual environment (first time), then run the test suite in TEST_WORKERS processes
#              (-rs: skip reasons)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# test processes (pytest-xdist), one per core of the 2-core machines CI runs on; a test file stays on one
TEST_WORKERS ?= 2

.PHONY: venv demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: venv
	$(PY) demo.py $(DEMO_ARGS)

test: venv
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf demo_out .pytest_cache
