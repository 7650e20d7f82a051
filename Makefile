# ldm — the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LDM := $(VENV)/bin/ldm
STAMP := $(VENV)/.installed
DATA ?= shapes
DATA_DIR ?= datasets/$(DATA)
RUN_DIR ?= checkpoints/$(DATA)
# test selection: `make test PYTEST_ARGS="-k vae"`
PYTEST_ARGS ?=

.PHONY: install data test test-slow clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

data: $(STAMP)
	$(LDM) data $(DATA) --out $(DATA_DIR)

# pytest exits 5 when it collects nothing: that is a failure here, as is any other non-zero exit.
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info ldm.egg-info .pytest_cache
