#!/bin/bash
cd /work/main
for client in pdserve aiperf; do
  date
  .venv/bin/pdserve bench compare --model /tmp/small --systems-file bench/configs/compare-cpu.yaml \
    --only pdserve-colocated,vllm-cpu --dataset-name random --random-input-len 256 \
    --random-range-ratio 0.5 --output-len 64 --num-prompts 60 --request-rate 1 --search-goodput \
    --rate-low 1.0 --rate-high 2.0 --rate-tolerance 0.1 --max-probes 5 --ignore-eos \
    --goodput ttft:2000 tpot:200 --seed 0 --max-model-len 2048 --save-result --disable-tqdm \
    --client $client --result-dir /tmp/xc/$client-client 2>&1 | grep -v "^aiperf: /" | tail -40
done
date
