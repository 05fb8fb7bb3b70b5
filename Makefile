# Two commands set everything up on a fresh machine:
#   make serve   install pdserve into .venv and start the server on the built-in tiny model
#   make test    install pdserve with its test dependencies into .venv and run the tests
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a CUDA machine use e.g. `make TORCH_SPEC=torch serve`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install install-test serve test test-fast proto clean

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .

install-test: $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"

serve: install
	$(VENV)/bin/pdserve serve $(SERVE_ARGS)

test: install-test
	$(PY) -m pytest -q -rs --durations=15 $(PYTEST_ARGS)

# the default suite without the slow (multi-process / Ray) tests
test-fast: install-test
	$(PY) -m pytest -q -rs -m "not slow" $(PYTEST_ARGS)

-include proto/Makefile.inc

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
