"""Triton varlen (prefill / chunked-prefill / mixed) attention over the paged cache.

The packed query rows of all requests are cut into tiles of BLOCK_Q tokens; a tile never spans two
requests. Tile ids are laid out without a host-side prefix sum: request b owns the ids

    [query_start_loc[b] // BLOCK_Q + b,  query_start_loc[b + 1] // BLOCK_Q + b + 1)

which is always at least ceil(q_len_b / BLOCK_Q) ids; the surplus programs exit at once, and a program
finds its request by binary search over query_start_loc (vLLM's unified-attention trick). The grid is
therefore (num_tokens // BLOCK_Q + num_seqs, Hkv), known without reading any device tensor.

One program: BLOCK_Q query tokens x the G query heads of one KV head, flattened into BLOCK_M rows
(row r = token r // BLOCK_G, head r % BLOCK_G), so a K/V tile is loaded once per group. Query row j of
request b sits at position seq_len_b - q_len_b + j and sees cache positions 0..that position: tokens
cached before the chunk (a prefix hit, earlier chunks) and the causal part of the chunk itself.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from pdkernels.checks import check_attention_inputs

_PREFILL_BLOCK_M = 128      # query rows (tokens x heads of one group) per program
_PREFILL_BLOCK_N = 64       # context tokens per inner iteration


def attention_block_dims(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> tuple[int, int, int]:
    """(group, padded group, BLOCK_D) for q [.., Hq, D] against caches [num_blocks, block_size, Hkv, D].

    Tiles are powers of two, and tl.dot needs every side >= 16, so head_dim is padded to >= 16 (and
    masked); callers whose whole M side is the group pad that to 16 themselves.
    """
    head_dim = q.shape[-1]
    group = check_attention_inputs(q, k_cache, v_cache)
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need unit stride along head_dim; call .contiguous()")
    return group, triton.next_power_of_2(group), max(16, triton.next_power_of_2(head_dim))


def dot_precision(q: Tensor) -> str:
    """Exact fp32 products for fp32 inputs (tf32 would cost ~1e-3 relative error); bf16/fp16 ignore it."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


@triton.jit
def _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest b with query_start_loc[b] // BLOCK_Q + b <= tile."""
    left: tl.int32 = 0
    right = num_seqs
    while left < right:
        mid = (left + right) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            left = mid + 1
        else:
            right = mid
    return left - 1


@triton.jit
def _varlen_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr,
                   query_start_loc_ptr, num_seqs, scale_log2,
                   stride_q_tok, stride_q_head, stride_k_block, stride_k_row, stride_k_head,
                   stride_v_block, stride_v_row, stride_v_head, stride_table, stride_out_tok, stride_out_head,
                   GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local_tile = tile - (q_start // BLOCK_Q + seq)
    if local_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_start = seq_len - q_len                       # tokens cached before this chunk

    offs_m = tl.arange(0, BLOCK_Q * BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    tok = local_tile * BLOCK_Q + offs_m // BLOCK_G       # [BLOCK_M] index within the chunk
    g = offs_m % BLOCK_G
    heads = kv_head * GROUP + g
    row_mask = (tok < q_len) & (g < GROUP)
    d_mask = offs_d < HEAD_DIM
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)           # [BLOCK_M, BLOCK_D]
    q_pos = context_start + tok                                                  # [BLOCK_M]

    # The last query token of this tile bounds the context any row of it can see.
    kv_end = tl.minimum(seq_len, context_start + (local_tile + 1) * BLOCK_Q)
    m_i = tl.full([BLOCK_Q * BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table
    for n0 in range(0, kv_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        p_mask = pos < kv_end
        block_ids = tl.load(table_row + pos // BLOCK_SIZE, mask=p_mask, other=0).to(tl.int64)
        rows = pos % BLOCK_SIZE
        kv_mask = p_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + block_ids[:, None] * stride_k_block + rows[:, None] * stride_k_row
                    + kv_head * stride_k_head + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_cache_ptr + block_ids[:, None] * stride_v_block + rows[:, None] * stride_v_row
                    + kv_head * stride_v_head + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * scale_log2   # [BLOCK_M, BLOCK_N]
        visible = p_mask[None, :] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_out_tok + heads[:, None] * stride_out_head + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                    query_start_loc: Tensor, scale: float, max_query_len: int | None = None,
                    max_seq_len: int | None = None) -> Tensor:
    """Same contract as pdkernels.ops.paged_attention (any mix of q_lens, decode rows included)."""
    num_tokens, num_q_heads, head_dim = q.shape
    group, block_g, block_d = attention_block_dims(q, k_cache, v_cache)
    out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_q = max(1, _PREFILL_BLOCK_M // block_g)
    num_tiles = num_tokens // block_q + num_seqs
    _varlen_kernel[(num_tiles, k_cache.shape[2])](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, num_seqs,
        scale * 1.4426950408889634, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=block_g, BLOCK_Q=block_q, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=k_cache.shape[1], BLOCK_N=_PREFILL_BLOCK_N, PRECISION=dot_precision(q),
        num_warps=4 if block_d <= 64 else 8, num_stages=2)
    return out
