#!/usr/bin/env bash
# Goodput of pdserve colocated and vLLM's CPU build on the 2-core AVX2 host (docs/kernels.md, "AVX2 hosts"),
# after the kernels' rewrite (07a2792), the issue's workload, one run; run from the repository root.
.venv/bin/pdserve bench compare --model /tmp/small --systems-file bench/configs/compare-cpu.yaml \
    --only pdserve-colocated,vllm-cpu --dataset-name random --random-input-len 256 \
    --random-range-ratio 0.5 --output-len 64 --num-prompts 60 --request-rate 0.5 --search-goodput \
    --rate-low 0.25 --rate-high 1.0 --rate-tolerance 0.1 --max-probes 4 --ignore-eos \
    --goodput ttft:2000 tpot:200 --seed 0 --max-model-len 2048 --save-result \
    --result-dir docs/results/compare-cpu-avx2-2026-12-03
