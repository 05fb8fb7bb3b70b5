"""Paged attention (varlen prefill / chunked prefill / mixed, and split-K decode) against the loop
reference in pdkernels.reference, for the torch CPU path (pdkernels.ops) and the Triton kernels."""

import pytest
import torch

from pdkernels import ops, reference
from tests.pdkernels.helpers import TRITON_DEVICE, assert_close, make_paged_batch, to_device

needs_gpu_for_bf16_dot = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="Triton's CPU interpreter returns garbage for bf16 tl.dot; bf16 Triton attention runs on CUDA")

# (q_lens, seq_lens): prefill from scratch, chunks after cached prefixes (not block-aligned), decode rows
# and a q_len-0 request mixed in, contexts that are not multiples of the block size.
VARLEN_CASES = [
    ([5], [5]),
    ([3, 1, 0, 6, 20], [9, 1, 13, 6, 37]),
    ([17, 1, 1, 33], [17, 50, 3, 70]),
]
# (num_q_heads, num_kv_heads, head_dim, block_size): MHA, GQA 4:1 and 3:1 (non power of 2), odd head_dim.
SHAPES = [(4, 4, 16, 4), (8, 2, 32, 16), (6, 2, 24, 5)]
DECODE_SEQ_LENS = [[1, 7, 40, 129], [64], [3, 100, 16, 17, 200]]


def _bf16_param(mark=None):
    return pytest.param(torch.bfloat16, marks=[mark] if mark else [], id="bf16")


def _expected_varlen(batch: dict, scale: float) -> torch.Tensor:
    return reference.paged_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
                                     batch["seq_lens"], batch["query_start_loc"], scale)


def _run_varlen(attention_fn, device: str, q_lens, seq_lens, shape, dtype, seed: int) -> None:
    num_q_heads, num_kv_heads, head_dim, block_size = shape
    gen = torch.Generator().manual_seed(seed)
    batch = make_paged_batch(q_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, gen)
    scale = head_dim ** -0.5
    expected = _expected_varlen(batch, scale)
    dev = to_device(batch, device)
    actual = attention_fn(dev["q"], dev["k_cache"], dev["v_cache"], dev["block_tables"], dev["seq_lens"],
                          dev["query_start_loc"], scale)
    assert_close(actual, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, _bf16_param()])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("q_lens, seq_lens", VARLEN_CASES)
def test_cpu_varlen_attention_matches_reference(q_lens, seq_lens, shape, dtype):
    _run_varlen(ops.paged_attention, "cpu", q_lens, seq_lens, shape, dtype, seed=1)


@pytest.mark.parametrize("dtype", [torch.float32, _bf16_param(needs_gpu_for_bf16_dot)])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("q_lens, seq_lens", VARLEN_CASES)
def test_triton_varlen_attention_matches_reference(q_lens, seq_lens, shape, dtype):
    from pdkernels import triton_attention
    _run_varlen(triton_attention.paged_attention, TRITON_DEVICE, q_lens, seq_lens, shape, dtype, seed=2)


def _run_decode(decode_fn, device: str, seq_lens, shape, dtype, seed: int, **kwargs) -> None:
    num_q_heads, num_kv_heads, head_dim, block_size = shape
    gen = torch.Generator().manual_seed(seed)
    batch = make_paged_batch([1] * len(seq_lens), seq_lens, num_q_heads, num_kv_heads, head_dim, block_size,
                             dtype, gen)
    scale = head_dim ** -0.5
    expected = _expected_varlen(batch, scale)
    dev = to_device(batch, device)
    actual = decode_fn(dev["q"], dev["k_cache"], dev["v_cache"], dev["block_tables"], dev["seq_lens"], scale,
                       **kwargs)
    assert_close(actual, expected, dtype)


@pytest.fixture(params=["compiled", "torch"])
def cpu_path(request, monkeypatch):
    """float32 CPU decode runs pdserve's compiled kernel where it is built; "torch" is what a machine
    without a compiler runs (both must match the reference)."""
    from pdkernels import cpu_native
    if request.param == "compiled" and cpu_native.library() is None:
        pytest.fail("pdserve's CPU kernels did not build here (g++ is part of the setup)")
    if request.param == "torch":
        monkeypatch.setattr(cpu_native, "library", lambda: None)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, _bf16_param()])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seq_lens", DECODE_SEQ_LENS)
def test_cpu_decode_attention_matches_reference(seq_lens, shape, dtype, cpu_path):
    _run_decode(ops.paged_decode_attention, "cpu", seq_lens, shape, dtype, seed=3)


@pytest.mark.parametrize("dtype", [torch.float32, _bf16_param(needs_gpu_for_bf16_dot)])
@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seq_lens", DECODE_SEQ_LENS[::2])
def test_triton_decode_attention_matches_reference(seq_lens, shape, num_splits, dtype):
    """num_splits 3 splits every context longer than 32 tokens and leaves some splits empty."""
    from pdkernels import triton_attention
    _run_decode(triton_attention.paged_decode_attention, TRITON_DEVICE, seq_lens, shape, dtype, seed=4,
                num_splits=num_splits)


def test_triton_decode_many_splits_of_one_long_context():
    """More splits than fit the short requests: the reduction must ignore empty splits."""
    from pdkernels import triton_attention
    _run_decode(triton_attention.paged_decode_attention, TRITON_DEVICE, [2, 300, 33], (4, 2, 16, 16),
                torch.float32, seed=5, num_splits=16)


def test_pure_decode_batch_dispatches_to_decode_path_with_same_result():
    """ops.paged_attention with every q_len 1 must equal the decode entry point and the reference."""
    gen = torch.Generator().manual_seed(6)
    batch = make_paged_batch([1, 1, 1], [5, 33, 18], 8, 2, 16, 4, torch.float32, gen)
    args = (batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"], batch["seq_lens"])
    via_varlen = ops.paged_attention(*args, batch["query_start_loc"], 0.25)
    via_decode = ops.paged_decode_attention(*args, 0.25)
    torch.testing.assert_close(via_varlen, via_decode, rtol=0, atol=0)
    assert_close(via_varlen, _expected_varlen(batch, 0.25), torch.float32)


def test_chunked_prefill_equals_one_shot_prefill():
    """A prompt prefilled in three chunks gives the rows a single full prefill gives."""
    gen = torch.Generator().manual_seed(7)
    batch = make_paged_batch([29], [29], 4, 2, 16, 4, torch.float32, gen)
    full = ops.paged_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
                               batch["seq_lens"], batch["query_start_loc"], 0.25)
    for start, end in [(0, 10), (10, 11), (11, 29)]:
        chunk = ops.paged_attention(batch["q"][start:end], batch["k_cache"], batch["v_cache"],
                                    batch["block_tables"], torch.tensor([end], dtype=torch.int32),
                                    torch.tensor([0, end - start], dtype=torch.int32), 0.25)
        torch.testing.assert_close(chunk, full[start:end], rtol=1e-5, atol=1e-5)


def test_attention_rejects_head_counts_that_do_not_group():
    gen = torch.Generator().manual_seed(8)
    batch = make_paged_batch([2], [2], 6, 4, 16, 4, torch.float32, gen)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        ops.paged_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
                            batch["seq_lens"], batch["query_start_loc"], 0.25)
