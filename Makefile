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

.PHONY: install install-test serve test test-fast gpu-check proto clean

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

# On a CUDA machine (with a CUDA build of torch, e.g. `make TORCH_SPEC=torch gpu-check`): the kernel tests
# compiled for the GPU and every gpu-marked test, the kernel and swap benchmarks, and the offline benchmark in
# bfloat16 on the small model, with CUDA graphs (the default) and with --enforce-eager. About 5 minutes
# on an H100; figures under docs/results/gpu/.
GPU_RESULTS ?= docs/results/gpu
GPU_MODEL ?= build/models/small
gpu-check: install-test
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make gpu-check needs a CUDA device and a CUDA build of torch (TORCH_SPEC)')"
	mkdir -p $(GPU_RESULTS)
	set -o pipefail; $(PY) -m pytest -q -rs tests/pdkernels 2>&1 | tee $(GPU_RESULTS)/kernel_tests.txt
	set -o pipefail; $(PY) -m pytest -q -rs -m gpu tests --ignore=tests/pdkernels 2>&1 | tee $(GPU_RESULTS)/gpu_tests.txt
	$(PY) -m bench.kernels --out $(GPU_RESULTS)/kernels.json | tee $(GPU_RESULTS)/kernels.txt
	$(PY) -m bench.swap --device cuda --json $(GPU_RESULTS)/swap_groups.json | tee $(GPU_RESULTS)/swap_groups.txt
	test -f $(GPU_MODEL)/config.json || $(VENV)/bin/pdserve make-model --size small --out $(GPU_MODEL)
	$(PY) -m bench.offline_throughput --model $(GPU_MODEL) --dtype bfloat16 --batch-sizes 1,8,32,64 \
		--input-len 128 --output-len 64 --json $(GPU_RESULTS)/offline_bf16.json | tee $(GPU_RESULTS)/offline_bf16.txt
	$(PY) -m bench.offline_throughput --model $(GPU_MODEL) --dtype bfloat16 --batch-sizes 1,8,32,64 \
		--input-len 128 --output-len 64 --skip-transformers --enforce-eager \
		--json $(GPU_RESULTS)/offline_bf16_eager.json | tee $(GPU_RESULTS)/offline_bf16_eager.txt

-include proto/Makefile.inc

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
