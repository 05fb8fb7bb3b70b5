"""pin_compute_threads (serving/runner/cpu_threads.py), each case in a fresh process: pinning changes the
process's threads for good, and whether OpenMP's workers exist yet depends on what ran before."""
import json
import os
import subprocess
import sys

import pytest

_CHECK = """
import json, os, sys
import torch
from serving.runner.cpu_threads import pin_compute_threads
cores = json.loads(sys.argv[1])
if sys.argv[2] == "late":
    torch.set_num_threads(len(cores)); torch.ones(1 << 18).add_(1.0)   # the OpenMP team exists already
result = pin_compute_threads(cores)
print(json.dumps({"caller": sorted(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
                  "compute": {str(t): c for t, c in result.compute.items()},
                  "actual": {str(t): sorted(os.sched_getaffinity(t)) for t in result.compute},
                  "others": {str(t): sorted(os.sched_getaffinity(t)) for t in result.others},
                  "unpinned": result.unpinned_workers}))
"""


def _pin_in_fresh_process(cores: list[int], when: str = "early") -> dict:
    out = subprocess.run([sys.executable, "-c", _CHECK, json.dumps(cores), when], capture_output=True, text=True,
                         timeout=120, check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_one_core_pins_the_caller_and_moves_the_rest_off_it():
    allowed = sorted(os.sched_getaffinity(0))
    result = _pin_in_fresh_process(allowed[:1])
    assert result["caller"] == allowed[:1] and result["threads"] == 1 and result["unpinned"] == 0
    for affinity in result["others"].values():
        assert affinity == allowed[1:]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_two_cores_pin_one_openmp_thread_to_each():
    cores = sorted(os.sched_getaffinity(0))[:2]
    result = _pin_in_fresh_process(cores)
    assert result["threads"] == 2 and result["unpinned"] == 0
    assert sorted(result["compute"].values()) == cores
    assert all(result["actual"][tid] == [core] for tid, core in result["compute"].items())


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_workers_started_before_the_call_are_reported_not_guessed():
    cores = sorted(os.sched_getaffinity(0))[:2]
    result = _pin_in_fresh_process(cores, when="late")
    assert result["unpinned"] == 1 and list(result["compute"].values()) == cores[:1]
    assert result["others"] == {}  # the existing worker is among the other threads: none is moved


def test_cores_outside_the_allowed_set_are_refused():
    from serving.runner.cpu_threads import pin_compute_threads
    with pytest.raises(ValueError, match="subset"):
        pin_compute_threads([max(os.sched_getaffinity(0)) + 1000])
