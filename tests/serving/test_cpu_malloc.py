"""keep_step_memory (serving/runner/cpu_malloc.py): after it, a step's large temporaries come back from
the heap instead of being faulted in page by page."""
import resource

import pytest
import torch

from serving.runner.cpu_malloc import keep_step_memory


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_repeated_large_temporaries_stop_faulting():
    if not keep_step_memory():
        pytest.skip("malloc is not glibc's")
    num_floats = 4 * 2**20  # 16 MiB: above glibc's default mmap threshold, below the one set
    torch.ones(num_floats).sum()  # the first one may fault its pages in
    before = _minor_faults()
    for _ in range(5):
        torch.ones(num_floats).sum()
    # without the settings each tensor faults in its 4096 pages again (20k faults here)
    assert _minor_faults() - before < 1000
