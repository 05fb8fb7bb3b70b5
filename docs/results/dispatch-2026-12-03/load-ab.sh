#!/bin/bash
# A/B: 1P1D with and without --prefill-while-reserving, the validation's synthetic workload
cd /work/main
for variant in $@; do
  flag=--prefill-while-reserving; [ $variant = reserve-first ] && flag=--no-prefill-while-reserving
  .venv/bin/pdserve serve --model /tmp/small --mode disaggregated --max-model-len 2048 --num-cpus-per-instance 1 \
      --no-enable-prefix-caching $flag --port 8200 > /tmp/ab/$variant-server.log 2>&1 &
  for i in $(seq 1 120); do curl -s localhost:8200/health >/dev/null && break; sleep 2; done
  for rate in 1 1.5; do
    .venv/bin/pdserve bench serve --base-url http://127.0.0.1:8200 --model /tmp/small --dataset-name random \
      --random-input-len 256 --random-output-len 32 --random-range-ratio 0.5 --ignore-eos --num-prompts 120 \
      --request-rate $rate --goodput ttft:2000 tpot:200 --seed 7 --disable-tqdm --save-result \
      --result-dir /tmp/ab/$variant --result-filename rate-$rate.json --label $variant 2>&1 | grep -E "attainment|Mean TTFT|Median TTFT|Mean TPOT" 
  done
  kill %1; wait
done
