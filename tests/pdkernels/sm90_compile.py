"""Compile every Triton kernel, exactly as its wrapper launches it, for an H100 (sm_90) without a GPU.

The wrappers in kernels.triton_* run on CPU tensors with each kernel swapped for a recorder that keeps
the launch arguments; each recorded launch is then compiled ahead of time with triton.compile for
sm_90 down to a cubin (Triton ships ptxas), and cuobjdump reports its registers, shared memory and
local memory (spills). This catches what the CPU interpreter cannot: type errors in compiled Triton,
tl.dot shape rules, shared-memory overflows and register spills.

Run in a fresh process without TRITON_INTERPRET (the interpreter replaces JITFunctions):
    python -m tests.pdkernels.sm90_compile [--json]
Exit status 1 when any kernel fails to compile.
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from pdkernels import triton_attention, triton_attention_prefill, triton_cache, triton_norm

_KERNELS = [(triton_norm, "_rms_norm_kernel"), (triton_norm, "_rotary_kernel"),
            (triton_cache, "_write_kv_kernel"), (triton_cache, "_copy_blocks_kernel"),
            (triton_attention, "_decode_split_kernel"), (triton_attention, "_decode_reduce_kernel"),
            (triton_attention_prefill, "_varlen_kernel")]


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records instead of launching."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def _compile(fn, args, kwargs, target: GPUTarget):
    """Compile one launch the way JITFunction.run would on a device of `target`.

    Uses Triton's own binder so the integer/pointer specialisations (divisibility by 16, which enables
    vectorised loads, and ints equal to 1) match a real launch. These are Triton internals
    (3.x); if they move, this helper is what needs updating, not the kernels.
    """
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _resource_usage(cubin: bytes) -> dict:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    keys = ("registers", "stack_bytes", "static_shared_bytes", "local_bytes")
    return dict(zip(keys, map(int, found.groups()))) if found else {}


def record_launches(dtype: torch.dtype) -> list:
    """Run each wrapper on representative shapes (Llama-8B-like: 32 q / 8 kv heads, head_dim 128)."""
    launches: list = []
    with ExitStack() as stack:
        for module, name in _KERNELS:
            stack.enter_context(mock.patch.object(module, name, _Recorder(getattr(module, name), launches)))
        x = torch.zeros(8, 4096, dtype=dtype)
        triton_norm.rms_norm(x, torch.ones(4096, dtype=dtype), 1e-5)
        triton_norm.rms_norm(x, torch.ones(4096, dtype=dtype), 1e-5, x)
        q, k = torch.zeros(8, 32, 128, dtype=dtype), torch.zeros(8, 8, 128, dtype=dtype)
        cos_sin = torch.zeros(64, 128)
        triton_norm.rotary_embedding(torch.zeros(8, dtype=torch.int64), q, k, cos_sin, True)
        triton_norm.rotary_embedding(torch.zeros(8, dtype=torch.int64), q, k, cos_sin, False)
        kv_cache = torch.zeros(2, 2, 64, 16, 8, 128, dtype=dtype)
        triton_cache.write_kv(k, k, kv_cache[0, 0], kv_cache[0, 1], torch.zeros(8, dtype=torch.int64))
        buffer = triton_cache.pack_kv(kv_cache, torch.arange(4), 0, 2)
        triton_cache.unpack_kv(buffer, kv_cache, torch.arange(4), 0)
        block_tables = torch.zeros(4, 8, dtype=torch.int32)
        seq_lens = torch.full((4,), 100, dtype=torch.int32)
        for num_splits in (1, 4):
            triton_attention.paged_decode_attention(q[:4], kv_cache[0, 0], kv_cache[0, 1], block_tables, seq_lens,
                                                    0.1, 100, num_splits)
        query_start_loc = torch.tensor([0, 2, 4, 6, 8], dtype=torch.int32)
        triton_attention.paged_attention(q, kv_cache[0, 0], kv_cache[0, 1], block_tables, seq_lens,
                                         query_start_loc, 0.1)
        # One request and one block: ints equal to 1 are specialised to constants by Triton.
        triton_attention.paged_attention(q, kv_cache[0, 0], kv_cache[0, 1], block_tables[:1], seq_lens[:1],
                                         query_start_loc[:2] * 4, 0.1)
        triton_attention.paged_decode_attention(q[:1], kv_cache[0, 0], kv_cache[0, 1], block_tables[:1],
                                                seq_lens[:1], 0.1, 100, 2)
        triton_cache.pack_kv(kv_cache, torch.arange(1), 0, 1)
        triton_attention.paged_attention(q[:, :8, :64].contiguous(), kv_cache[0, 0, ..., :64].contiguous(),
                                         kv_cache[0, 1, ..., :64].contiguous(), block_tables, seq_lens,
                                         query_start_loc, 0.1)
    return launches


def compile_all(arch: int = 90) -> list[dict]:
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        for fn, args, kwargs in record_launches(dtype):
            constexprs = {p.name: v for p, v in zip(fn.params, args) if p.is_constexpr}
            constexprs |= {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
            entry = dict(kernel=fn.__name__, dtype=str(dtype).removeprefix("torch."), constexprs=constexprs,
                         num_warps=kwargs.get("num_warps"), num_stages=kwargs.get("num_stages"))
            try:
                compiled = _compile(fn, args, kwargs, GPUTarget("cuda", arch, 32))
                entry |= dict(ok=True, uses_mma="mma" in compiled.asm["ptx"],
                              async_copies="async_copy" in compiled.asm["ttgir"],
                              **_resource_usage(compiled.asm["cubin"]), shared_bytes=compiled.metadata.shared)
            except Exception as exc:   # report every kernel's failure, not just the first
                entry |= dict(ok=False, error=f"{type(exc).__name__}: {str(exc)[:2000]}")
            results.append(entry)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    args = parser.parse_args()
    results = compile_all(args.arch)
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            status = (f"regs {r.get('registers')} shared {r.get('shared_bytes')} local {r.get('local_bytes')}"
                      f" mma {r.get('uses_mma')} async {r.get('async_copies')}" if r["ok"] else r["error"])
            print(f"{r['kernel']:24s} {r['dtype']:9s} {'ok  ' if r['ok'] else 'FAIL'} {status}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
