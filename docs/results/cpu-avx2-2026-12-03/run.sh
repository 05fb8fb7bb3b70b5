#!/usr/bin/env bash
# The CPU kernels before (bdd9d9f: 16-float vectors everywhere) and after (07a2792: vec.h's vf, the host's
# own vector width) on a 2-core AVX2 host (AMD EPYC, Zen 1: lscpu in host.txt), one after the other, quiet
# box, small model, float32. Run from the repository root with the old tree checked out beside it:
#   git worktree add /tmp/old bdd9d9f && pdserve make-model --size small --out /tmp/small
set -euo pipefail
OUT=docs/results/cpu-avx2-2026-12-03
OLD=/tmp/old
PY=$PWD/.venv/bin/python
NEW_CACHE=$(mktemp -d) OLD_CACHE=$(mktemp -d)   # each tree's kernel library built apart
lscpu | grep -E "Model name|CPU family|^Model:|Flags|L[123]" > $OUT/host.txt
linear="-m bench.cpu_linear --ms 1,2,4,8 --shapes qkv,o,gate_up,down,lm_head --repeats 3"
step="-m bench.cpu_step --model /tmp/small --batch-sizes 1,2,4,8 --repeats 5 --prefill-tokens 16"
(cd $OLD && PDSERVE_CACHE_DIR=$OLD_CACHE $PY $linear) > $OUT/cpu_linear_old.txt 2>&1
PDSERVE_CACHE_DIR=$NEW_CACHE $PY $linear > $OUT/cpu_linear_new.txt 2>&1
PDSERVE_CACHE_DIR=$NEW_CACHE $PY -m bench.cpu_attention --baseline-rev bdd9d9f --batches 1,4,8 \
    --contexts 256,1024 --rounds 3 > $OUT/cpu_attention.txt 2>&1
for round in 1 2; do
    (cd $OLD && PDSERVE_CACHE_DIR=$OLD_CACHE $PY $step) > $OUT/cpu_step_old_$round.txt 2>&1
    PDSERVE_CACHE_DIR=$NEW_CACHE $PY $step > $OUT/cpu_step_new_$round.txt 2>&1
done
# then offline throughput against vLLM's CPU build (its venv as ../shared/PEERS.md installs it), this tree
PDSERVE_CACHE_DIR=$NEW_CACHE $PY -m bench.offline_vs_vllm --model /tmp/small --batch-sizes 1,2,4,8,16,32,64 \
    --repeats 1 --json $OUT/offline_vs_vllm.json > $OUT/offline_vs_vllm.txt 2>&1
