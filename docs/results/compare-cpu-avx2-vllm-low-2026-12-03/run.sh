#!/usr/bin/env bash
# vLLM CPU's goodput bracket below 0.25 req/s on the 2-core Zen 1 host, the workload of
# compare-cpu-avx2-2026-12-03/run.sh (whose search was cut before vLLM's bracket was found); one run,
# run from the repository root with vLLM's venv as ../shared/PEERS.md installs it.
set -euo pipefail
.venv/bin/pdserve bench compare --model /tmp/small --systems-file bench/configs/compare-cpu.yaml \
    --only vllm-cpu --dataset-name random --random-input-len 256 \
    --random-range-ratio 0.5 --output-len 64 --num-prompts 60 --request-rate 0.125 --search-goodput \
    --rate-low 0.125 --rate-high 0.25 --rate-tolerance 0.07 --max-probes 2 --ignore-eos \
    --goodput ttft:2000 tpot:200 --seed 0 --max-model-len 2048 --save-result \
    --result-dir docs/results/compare-cpu-avx2-vllm-low-2026-12-03
