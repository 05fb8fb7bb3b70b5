#!/usr/bin/env bash
# CPU decode attention's pass 1 depth first (46cac4d), then its prefetches spread (the commit after it),
# against the kernel before both (0f704eb), on the 2-core AMD EPYC Zen 1 host (AVX2, 16 vector registers:
# host.txt), the small model's shapes, float32, one thread. Runs 1-2 and the steps' rounds 1-2 were taken
# at 46cac4d, the rest at the commit after it; from the repository root with the baseline tree beside it:
#   git worktree add /tmp/wt 0f704eb && pdserve make-model --size small --out /tmp/small
set -euo pipefail
OUT=docs/results/cpu-avx2-attention-2026-12-03
PY=$PWD/.venv/bin/python
# the kernel alone, this tree against 0f704eb's (run 1: 3 rounds, run 2: 7)
$PY -m bench.cpu_attention --baseline-rev 0f704eb --batches 1,4,8 --contexts 256,1024 --rounds 3 \
    --json $OUT/cpu_attention_1.json > $OUT/cpu_attention_1.txt 2>&1
$PY -m bench.cpu_attention --baseline-rev 0f704eb --batches 1,4,8 --contexts 256,1024 --rounds 7 \
    --json $OUT/cpu_attention_2.json > $OUT/cpu_attention_2.txt 2>&1
# runs 3-4 at the commit after 46cac4d: its kernel against 46cac4d's and against 0f704eb's
$PY -m bench.cpu_attention --baseline-rev 46cac4d --batches 1,4,8 --contexts 256,1024 --rounds 7 \
    --json $OUT/cpu_attention_3.json > $OUT/cpu_attention_3.txt 2>&1
$PY -m bench.cpu_attention --baseline-rev 0f704eb --batches 1,4,8 --contexts 256,1024 --rounds 7 \
    --json $OUT/cpu_attention_4.json > $OUT/cpu_attention_4.txt 2>&1
# the same kernel with every table entry naming one block (K/V cache-resident): its compute alone
$PY $OUT/attention_hot.py > $OUT/attention_hot.txt 2>&1
# whole decode steps, old and new in turns, each tree's library built apart
OLDC=$(mktemp -d) NEWC=$(mktemp -d)
step="-m bench.cpu_step --model /tmp/small --batch-sizes 1,2,4,8 --repeats 5 --prefill-tokens 16"
for r in 1 2; do   # rounds 3 and 4 the same, at the commit after 46cac4d
    (cd /tmp/wt && PDSERVE_CACHE_DIR=$OLDC $PY $step) > $OUT/cpu_step_old_$r.txt 2>&1
    PDSERVE_CACHE_DIR=$NEWC $PY $step > $OUT/cpu_step_new_$r.txt 2>&1
done
# where the time goes: the kernel against copies with pass 3 or pass 1 cut out (46cac4d's kernel checked
# out for the first file, the commit after it for the second)
$PY $OUT/pass_split.py > $OUT/pass_split_46cac4d.txt 2>&1
$PY $OUT/pass_split.py > $OUT/pass_split.txt 2>&1
