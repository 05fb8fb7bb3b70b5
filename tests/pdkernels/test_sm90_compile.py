"""Every Triton kernel, launched as its wrapper launches it, compiles for sm_90 (H100) to a cubin.

Runs on any machine (Triton ships ptxas); catches compile-time errors the CPU interpreter cannot see.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_all_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests.pdkernels.sm90_compile", "--json"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip(), f"no report from sm90_compile:\n{proc.stderr[-4000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failures = [f"{r['kernel']} ({r['dtype']}): {r['error']}" for r in results if not r["ok"]]
    assert not failures, "\n".join(failures)
    compiled = {r["kernel"] for r in results}
    assert {"_decode_split_kernel", "_decode_reduce_kernel", "_varlen_kernel", "_write_kv_kernel",
            "_copy_blocks_kernel", "_rms_norm_kernel", "_rotary_kernel"} <= compiled
    # bf16 attention must run its dots on tensor cores, not fall back to FMA loops.
    assert all(r["uses_mma"] for r in results
               if r["dtype"] == "bfloat16" and r["kernel"] in ("_decode_split_kernel", "_varlen_kernel"))
    assert proc.returncode == 0
