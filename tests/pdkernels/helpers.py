"""Shared builders for the kernel tests: random paged batches with scattered blocks and garbage table
entries, the device the Triton kernels run on, and per-dtype tolerances."""

import torch

# Triton kernels run compiled on CUDA, interpreted on CPU (see conftest.py).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Tolerances against the float64 references; bf16 allows a couple of ulps at magnitude ~4.
TOLERANCES = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}
GARBAGE_BLOCK_ID = 2**30     # what an engine may leave in unused block-table entries


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.cpu().float(), expected.cpu().float(), **TOLERANCES[dtype])


def make_paged_batch(q_lens: list[int], seq_lens: list[int], num_q_heads: int, num_kv_heads: int,
                     head_dim: int, block_size: int, dtype: torch.dtype, generator: torch.Generator,
                     extra_blocks: int = 7) -> dict:
    """A random batch over a cache whose every block holds random data.

    Each request gets distinct blocks drawn in random order from a pool larger than needed, so block
    tables have holes (unused blocks in between) and are not sorted; entries past a request's last
    block hold GARBAGE_BLOCK_ID, and any kernel that reads one fails or returns wrong numbers.
    """
    num_used = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(num_used) + extra_blocks
    max_blocks = max(num_used + [1]) + 2
    perm = torch.randperm(num_blocks, generator=generator)
    block_tables = torch.full((len(seq_lens), max_blocks), GARBAGE_BLOCK_ID, dtype=torch.int32)
    cursor = 0
    for b, n in enumerate(num_used):
        block_tables[b, :n] = perm[cursor:cursor + n].int()
        cursor += n
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(dtype)
    query_start_loc = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).int()
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, generator=generator).to(dtype)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32), query_start_loc=query_start_loc)


def to_device(batch: dict, device: str) -> dict:
    return {name: t.to(device) for name, t in batch.items()}


def torch_path(fn):
    """fn with pdserve's compiled CPU kernels switched off: the torch path a machine without a compiler runs."""
    import functools
    from unittest import mock

    from pdkernels import cpu_native

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with mock.patch.object(cpu_native, "library", lambda: None):
            return fn(*args, **kwargs)
    return run


def compiled_path(fn):
    """fn with pdserve's compiled CPU kernels required (float32 on CPU runs them)."""
    import functools

    from pdkernels import cpu_native

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if cpu_native.library() is None:
            raise AssertionError("pdserve's CPU kernels did not build here (g++ is part of the setup)")
        return fn(*args, **kwargs)
    return run
