# Two commands set everything up on a fresh machine:
#   make serve   install pdserve into .venv and start the server on the built-in tiny model
#   make test    install pdserve with its test dependencies into .venv and run the tests
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a CUDA machine use e.g. `make TORCH_SPEC=torch serve`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install install-test serve test test-fast gpu-check gpu-wheels proto clean

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	$(PY) -m pdkernels  # compile the CPU kernels now rather than at the first request

install-test: $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	$(PY) -m pdkernels

serve: install
	$(VENV)/bin/pdserve serve $(SERVE_ARGS)

# the versions a fresh install resolved (the unpinned ones move under us: transformers 5.25 did)
VERSIONS := torch transformers kernels tokenizers triton ray grpcio fastapi openai
test: install-test
	@$(PY) -c "import importlib.metadata as m; print('versions:', *sorted(f'{d.name}=={d.version}' \
		for d in m.distributions() if d.name.lower() in '$(VERSIONS)'.split()))"
	$(PY) -m pytest -q -rs --durations=15 $(PYTEST_ARGS)

# the default suite without the slow (multi-process / Ray) tests
test-fast: install-test
	$(PY) -m pytest -q -rs -m "not slow" $(PYTEST_ARGS)

# On a CUDA machine (with a CUDA build of torch, e.g. `make TORCH_SPEC=torch gpu-check`): every check
# that needs a GPU (bench/gpu_check.py: the gpu-marked tests, the kernel tests compiled, the swap,
# offline and kernel benchmarks), about 10 minutes on an H100; logs and summary under docs/results/gpu/.
GPU_RESULTS ?= docs/results/gpu
gpu-check: install-test
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make gpu-check needs a CUDA device and a CUDA build of torch (TORCH_SPEC)')"
	$(PY) -m bench.gpu_check --out $(GPU_RESULTS)

# For a GPU machine that cannot install packages (no network; its python3 3.12 holds torch and most of
# the rest): the wheels its image lacks or holds too old, into .whl/ (bench/gpu_check.py says how to use them)
gpu-wheels: install-test
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$$($(PY) -c "import grpc, google.protobuf as p, zmq; print(f'grpcio=={grpc.__version__} protobuf=={p.__version__} pyzmq=={zmq.pyzmq_version()}')")
	ls -la .whl

-include proto/Makefile.inc

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
