#!/bin/bash
# lower rates, where attainment crosses 90%: the goodput comparison at the 2 s TTFT SLO
cd /work/main
date
.venv/bin/python -m bench.validate_simulator --model /tmp/small --max-model-len 2048 --systems 1p1d \
    --dataset-name random --random-input-len 256 --random-output-len 32 --random-range-ratio 0.5 \
    --num-prompts 80 --request-rate 0.25,0.3 --goodput ttft:2000 tpot:200 --seed 9 --disable-tqdm \
    --result-dir /tmp/rep/C2 > /tmp/rep/C2.log 2>&1
echo "rc C2 $?"
date
