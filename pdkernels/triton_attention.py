"""Triton paged attention: a split-K decode kernel (+ its reduction) and a varlen prefill kernel.

Both read K/V straight from the paged cache through the block table, one token row at a time, so any
block size works and the gathered context never exists in memory:

    position p of request b  ->  block_tables[b, p // block_size], row p % block_size

Both are GQA-aware: one program owns one KV head and all the query heads that share it, so each K/V
tile is loaded once for the whole group. The softmax is the online (flash) form in base 2, with the
scale and log2(e) applied to the scores.

Decode, split along the context (num_splits = 3):

    context   [ split 0      | split 1      | split 2   ]   seq_len
    program   (b, kv_head, 0)  (b, kv_head, 1)  ...          -> partial out [B, Hq, 3, D], lse [B, Hq, 3]
    reduce    (b, head): out = sum_s exp(lse_s - max) * out_s / sum_s exp(lse_s - max)
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from pdkernels.triton_attention_prefill import paged_attention  # noqa: F401  (re-exported)
from pdkernels.triton_attention_prefill import attention_block_dims, dot_precision

_DECODE_BLOCK_N = 64        # context tokens per inner iteration
_TARGET_PROGRAMS = 528      # about 4 programs per SM on an H100 (132 SMs)
_MIN_TOKENS_PER_SPLIT = 256
_SPLIT_ALIGN = 16


@triton.jit
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr,
                         part_out_ptr, part_lse_ptr, scale_log2, tokens_per_split, num_q_heads, num_splits,
                         stride_q_seq, stride_q_head, stride_k_block, stride_k_row, stride_k_head,
                         stride_v_block, stride_v_row, stride_v_head, stride_table,
                         stride_out_seq, stride_out_head,
                         GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                         SINGLE_SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g                                        # [BLOCK_G]
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)          # [BLOCK_G, BLOCK_D]

    # -1e30 rather than -inf keeps exp2(m_old - m_new) finite for padded heads.
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)                                    # [BLOCK_N]
        p_mask = pos < end
        block_ids = tl.load(block_tables_ptr + seq * stride_table + pos // BLOCK_SIZE, mask=p_mask,
                            other=0).to(tl.int64)
        rows = pos % BLOCK_SIZE
        kv_mask = p_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + block_ids[:, None] * stride_k_block + rows[:, None] * stride_k_row
                    + kv_head * stride_k_head + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_cache_ptr + block_ids[:, None] * stride_v_block + rows[:, None] * stride_v_row
                    + kv_head * stride_v_head + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * scale_log2   # [BLOCK_G, BLOCK_N]
        s = tl.where(p_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        m_i = m_new

    out_mask = g_mask[:, None] & d_mask[None, :]
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    if SINGLE_SPLIT:
        out = acc / safe_l[:, None]
        tl.store(out_ptr + seq * stride_out_seq + heads[:, None] * stride_out_head + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # part_out [B, Hq, num_splits, BLOCK_D] fp32 normalised; part_lse [B, Hq, num_splits] (log2).
        part_row = (seq * num_q_heads + heads) * num_splits + split
        tl.store(part_out_ptr + part_row[:, None] * BLOCK_D + offs_d[None, :], acc / safe_l[:, None],
                 mask=out_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(part_lse_ptr + part_row, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(part_out_ptr, part_lse_ptr, out_ptr, num_heads, num_splits, stride_out_seq,
                          stride_out_head, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_SPLITS: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    row = (seq * num_heads + head) * num_splits
    lse = tl.load(part_lse_ptr + row + offs_s, mask=s_mask, other=float("-inf"))   # [BLOCK_SPLITS]
    weights = tl.exp2(lse - tl.max(lse, axis=0))                                      # empty splits -> 0
    parts = tl.load(part_out_ptr + (row + offs_s)[:, None] * BLOCK_D + offs_d[None, :],
                    mask=s_mask[:, None], other=0.0)                                  # [BLOCK_SPLITS, BLOCK_D]
    out = tl.sum(parts * weights[:, None], axis=0) / tl.sum(weights, axis=0)
    tl.store(out_ptr + seq * stride_out_seq + head * stride_out_head + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int) -> int:
    """Enough (seq, kv_head, split) programs to fill the GPU, but no split shorter than 256 tokens."""
    wanted = triton.cdiv(_TARGET_PROGRAMS, max(1, num_seqs * num_kv_heads))
    return max(1, min(wanted, triton.cdiv(max_seq_len, _MIN_TOKENS_PER_SPLIT)))


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           seq_lens: Tensor, scale: float, max_seq_len: int | None = None,
                           num_splits: int | None = None) -> Tensor:
    """Same contract as pdkernels.ops.paged_decode_attention; q [B, Hq, D] -> [B, Hq, D]."""
    num_seqs, num_q_heads, head_dim = q.shape
    group, group_pad, block_d = attention_block_dims(q, k_cache, v_cache)
    block_g = max(16, group_pad)         # the group is the whole M side of the decode dots
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    num_kv_heads = k_cache.shape[2]
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_seq_len)
    # Splits are whole multiples of _SPLIT_ALIGN tokens; loads are per-token gathers, so a split need
    # not start on a BLOCK_N boundary.
    max_seq_len = max(max_seq_len, 1)
    num_splits = max(1, min(num_splits, triton.cdiv(max_seq_len, _SPLIT_ALIGN)))
    tokens_per_split = triton.cdiv(triton.cdiv(max_seq_len, num_splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    num_splits = triton.cdiv(max_seq_len, tokens_per_split)
    # num_splits is a runtime argument (only "one split or more" is compiled in), so batches of
    # changing size and context do not trigger a recompile each.
    part_out = part_lse = out            # unused placeholders when there is a single split
    if num_splits > 1:
        part_out = torch.empty((num_seqs, num_q_heads, num_splits, block_d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_seqs, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse, scale * 1.4426950408889634,
        tokens_per_split, num_q_heads, num_splits, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_N=_DECODE_BLOCK_N, SINGLE_SPLIT=num_splits == 1, PRECISION=dot_precision(q),
        num_warps=4)
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_q_heads)](
            part_out, part_lse, out, num_q_heads, num_splits, out.stride(0), out.stride(1), HEAD_DIM=head_dim,
            BLOCK_D=block_d, BLOCK_SPLITS=triton.next_power_of_2(num_splits))
    return out
