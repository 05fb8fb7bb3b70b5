"""The CPU serving path must not load pdserve's Triton kernels: the ops import pdkernels.triton_* only for
CUDA tensors, so a CPU server never JIT-compiles or interprets them. (torch itself may import the
triton package, e.g. for SDPA's lower-right causal bias.)"""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_cpu_ops_never_import_triton_kernels():
    code = """
import sys, torch
from pdkernels import ops, compute_cos_sin_cache
q = torch.randn(5, 4, 16); cache = torch.randn(6, 4, 2, 16)
ops.paged_attention(q, cache, cache, torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
                    torch.tensor([4, 3], dtype=torch.int32), torch.tensor([0, 3, 5], dtype=torch.int32), 0.25)
ops.rotary_embedding(torch.arange(5), q, q[:, :2], compute_cos_sin_cache(16, 8, 1e4))
print(sorted(m for m in sys.modules if m.startswith("pdkernels.triton")))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
