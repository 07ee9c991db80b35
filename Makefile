# `make demo` and `make test` each set up .venv on first use; nothing else is needed on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JOBS ?= 2

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,demo]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py
	$(PY) tools/stream_demo.py --frames 60 --clips 4 --out runs/stream_demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -n $(JOBS) --timeout=1200 -q -rs tests

test-fast: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -n $(JOBS) -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check visionmix tools tests

bench: $(STAMP)
	$(PY) tools/benchmark.py --op na2d

clean:
	rm -rf $(VENV) .cache .pytest_cache
