"""Smoke tests of the CPU step benchmarks: they run end to end and report what they claim to (numbers
are never asserted). Each runs in its own process: the step benchmark pins threads."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pdkernels import cpu_native
from serving.models.cpu_linear import packing_supported

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
needs_onednn = pytest.mark.skipif(not packing_supported(torch.device("cpu"), torch.float32),
                                  reason="this torch has no oneDNN")


def _run(args: list[str]) -> str:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, check=True,
                          cwd=ROOT).stdout


@needs_onednn
def test_cpu_step_reports_every_case(tiny_model_dir, tmp_path):
    out = tmp_path / "step.json"
    _run(["bench.cpu_step", "--model", tiny_model_dir, "--batch-sizes", "1,4", "--context", "40",
          "--prefill-tokens", "24", "--repeats", "1", "--compare-plain", "--breakdown", "--buffer-mib", "64",
          "--json", str(out)])
    result = json.loads(out.read_text())
    assert [row["case"] for row in result["rows"]] == ["decode b=1", "decode b=4", "prefill 24"]
    assert all(row["step_s"] > 0 and row["plain_step_s"] > 0 for row in result["rows"])
    assert result["weight_bytes"] > 0 and all(rate > 0 for rate in result["bandwidth_bps"])
    for shares in result["shares"].values():
        assert set(shares) >= {"linear", "attention", "norms", "rotary", "rest"}
        assert shares["linear"] > 0 and shares["attention"] > 0


@needs_onednn
def test_cpu_linear_checks_and_times_every_method(tmp_path):
    out = tmp_path / "linear.json"
    _run(["bench.cpu_linear", "--shapes", "o", "--ms", "1,3", "--repeats", "1", "--hot", "--json", str(out)])
    rows = json.loads(out.read_text())["results"]["o"]
    assert [row["M"] for row in rows] == [1, 3]
    for row in rows:
        assert {"linear", "onednn[1]", "onednn[128]", "w@xT", "x@wT"} <= set(row["ms"])
        assert all(err < 1e-3 for err in row["rel_err"].values())


@pytest.mark.skipif(cpu_native.compiler() is None, reason="no C++ compiler: the kernels cannot be built")
def test_cpu_attention_compares_a_revision_with_the_tree(tmp_path):
    out = tmp_path / "attention.json"
    _run(["bench.cpu_attention", "--baseline-tree", ROOT, "--batches", "1,3", "--contexts", "48", "--layers", "2",
          "--rounds", "1", "--json", str(out)])  # a tree, not a revision: the test needs no git history
    rows = json.loads(out.read_text())["rows"]
    assert [(row["batch"], row["context"]) for row in rows] == [(1, 48), (3, 48)]
    assert all(row["baseline_ms"] > 0 and row["tree_ms"] > 0 and row["read_ms"] > 0 for row in rows)
