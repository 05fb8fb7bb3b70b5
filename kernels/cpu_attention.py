"""Torch paths of paged attention: what pdserve runs on CPU (and any non-CUDA device).

Both gather each request's KV from the paged cache with one vectorised index and hand the math to
torch's SDPA; GQA is handled by folding the query heads of one KV head into the query-length axis, so
K/V are never repeated per query head.

Block table to gathered context (block_size 4, seq_len 10, table row [7, 2, 9, <garbage>]):

    positions  0 1 2 3 | 4 5 6 7 | 8 9 . .
    block      7       | 2       | 9          garbage entries are replaced by block 0 before
                                                the gather and their positions masked out
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def gather_context(cache: Tensor, block_tables: Tensor, seq_lens: Tensor, max_seq_len: int) -> Tensor:
    """Gather [B, num_ctx_blocks * block_size, Hkv, D] from cache [num_blocks, block_size, Hkv, D].

    Entries of block_tables past a request's last block may hold any value; they are read as block 0.
    """
    block_size = cache.shape[1]
    num_ctx_blocks = max(1, -(-max_seq_len // block_size))
    table = block_tables[:, :num_ctx_blocks].long()                       # [B, nb]
    num_used_blocks = (seq_lens.long() + block_size - 1) // block_size    # [B]
    in_use = torch.arange(num_ctx_blocks, device=table.device)[None, :] < num_used_blocks[:, None]
    table = torch.where(in_use, table, torch.zeros_like(table))
    gathered = cache[table]                                               # [B, nb, bs, Hkv, D]
    return gathered.flatten(1, 2)                                         # [B, nb*bs, Hkv, D]


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                     seq_lens: Tensor, scale: float, max_seq_len: int | None = None) -> Tensor:
    """One query token per request, the whole batch in one padded SDPA call. q [B, Hq, D] -> [B, Hq, D]."""
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if num_seqs == 0:
        return torch.empty_like(q)
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    keys = gather_context(k_cache, block_tables, seq_lens, max_seq_len)      # [B, S, Hkv, D]
    values = gather_context(v_cache, block_tables, seq_lens, max_seq_len)
    num_ctx = keys.shape[1]
    valid = torch.arange(num_ctx, device=q.device)[None, :] < seq_lens.long()[:, None]   # [B, S]
    q4 = q.view(num_seqs, num_kv_heads, group, head_dim)                     # [B, Hkv, G, D]
    k4 = keys.transpose(1, 2).to(q.dtype)                                    # [B, Hkv, S, D]
    v4 = values.transpose(1, 2).to(q.dtype)
    out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=valid[:, None, None, :], scale=scale)
    return out.reshape(num_seqs, num_q_heads, head_dim)


def prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_len: int,
                      scale: float) -> Tensor:
    """One request's query rows q [L, Hq, D] (the last L of its seq_len positions) -> [L, Hq, D]."""
    num_q, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    block_size = k_cache.shape[1]
    table = block_table[: -(-seq_len // block_size)].long()
    keys = k_cache[table].flatten(0, 1)[:seq_len].to(q.dtype)                # [S, Hkv, D]
    values = v_cache[table].flatten(0, 1)[:seq_len].to(q.dtype)
    # Query row j sits at absolute position seq_len - L + j and sees cache positions <= that.
    q_pos = torch.arange(seq_len - num_q, seq_len, device=q.device)
    mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [L, S]
    # Fold the G query heads of each KV head into the row axis: [Hkv, G*L, D] against [Hkv, S, D].
    q3 = q.view(num_q, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(
        num_kv_heads, group * num_q, head_dim)
    out = F.scaled_dot_product_attention(
        q3, keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask.repeat(group, 1), scale=scale)
    return out.view(num_kv_heads, group, num_q, head_dim).permute(2, 0, 1, 3).reshape(
        num_q, num_q_heads, head_dim)


def varlen_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                     query_start_loc: Tensor, scale: float) -> Tensor:
    """Mixed batch: decode rows (q_len 1) in one batched call, each prefill chunk in its own call."""
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    q_lens = [starts[b + 1] - starts[b] for b in range(len(lens))]
    decode_ids = [b for b, n in enumerate(q_lens) if n == 1]
    if decode_ids:
        ids = torch.tensor(decode_ids, device=q.device)
        rows = query_start_loc[:-1].long()[ids]
        out[rows] = decode_attention(q[rows], k_cache, v_cache, block_tables[ids], seq_lens[ids], scale,
                                     max(lens[b] for b in decode_ids))
    for b, num_q in enumerate(q_lens):
        if num_q > 1:
            rows = slice(starts[b], starts[b + 1])
            out[rows] = prefill_attention(q[rows], k_cache, v_cache, block_tables[b], lens[b], scale)
    return out
