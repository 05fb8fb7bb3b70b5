"""keep_step_memory (serving/runner/cpu_malloc.py): after it, a step's large temporaries come back from
the heap instead of being faulted in page by page. Each case runs in a fresh process: the settings
are process-wide, and ModelRunner applies them in this one."""
import os
import subprocess
import sys

import pytest

_STEPS = """
import resource, sys, torch
from serving.runner.cpu_malloc import keep_step_memory
torch.set_num_threads(1)  # worker threads allocate from arenas of their own, which glibc trims apart
if sys.argv[1] == "kept" and not keep_step_memory():
    print(-1); sys.exit()
def step():  # decode attention's pattern: two 8 MiB gathered temporaries per layer, used, freed
    for layer in range(4):  # (filled, not gathered: reads of a big cache could fault for other reasons)
        k, v = torch.empty(500, 4096).fill_(1.0), torch.empty(500, 4096).fill_(2.0)
        (k * 2).sum(0) + v.sum(0)

faults = []
for _ in range(46):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults[6:])  # the first steps fault the heap in
"""


def _faults_per_step(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, timeout=120,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    return [int(n) for n in out.stdout.strip().splitlines()[-1].split()]


def test_step_temporaries_stop_faulting():
    """Kept, a step faults (almost) nothing once the heap has grown to the step's peak. A fresh process's
    heap still grows by one 8 MiB temporary (2000 faults) at a few steps spaced further and further apart
    (e.g. steps 1, 5, 21 or 3, 33, 165: blocks freed around small long-lived ones are not always
    coalesced), so of 40 steps after the first six at most three may fault; without the settings most
    steps fault some of their temporaries in again (glibc's own mmap threshold moves up and down)."""
    kept = _faults_per_step("kept")
    if kept == [-1]:
        pytest.skip("malloc is not glibc's: keep_step_memory changes nothing")
    default = _faults_per_step("default")
    assert len(kept) == len(default) == 40
    assert sum(n > 100 for n in kept) <= 3, kept
    assert sum(default) > 10 * max(sum(kept), 1), (sum(kept), sum(default))
