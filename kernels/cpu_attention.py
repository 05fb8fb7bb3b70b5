"""Torch paths of paged attention: what pdserve runs on CPU (and any non-CUDA device).

Both gather each request's KV from the paged cache with one vectorised index and hand the math to
torch's SDPA without repeating K/V per query head: decode views the G query heads of a KV head as G
query rows, prefill uses SDPA's enable_gqa.

Block table to gathered context (block_size 4, seq_len 10, table row [7, 2, 9, <garbage>]):

    positions  0 1 2 3 | 4 5 6 7 | 8 9 . .
    block      7       | 2       | 9          slot = block * 4 + position % 4; positions past
    slot      28 ... 31| 8 ... 11|36 37 0 0     seq_len read slot 0 and are masked out
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def context_slots(block_tables: Tensor, seq_lens: Tensor, block_size: int, max_seq_len: int
                  ) -> tuple[Tensor, Tensor]:
    """Cache slot of every context position: slots [B, max_seq_len] int64 and valid [B, max_seq_len].

    Positions at or past a request's seq_len (whose table entries may hold anything) read slot 0 and
    are marked invalid.
    """
    positions = torch.arange(max_seq_len, device=block_tables.device)                  # [S]
    block_index = (positions // block_size).clamp(max=block_tables.shape[1] - 1)
    block_ids = block_tables.long()[:, block_index]                                     # [B, S]
    valid = positions[None, :] < seq_lens.long()[:, None]
    slots = torch.where(valid, block_ids * block_size + positions % block_size, 0)
    return slots, valid


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                     seq_lens: Tensor, scale: float, max_seq_len: int | None = None) -> Tensor:
    """One query token per request, the whole batch in one padded SDPA call. q [B, Hq, D] -> [B, Hq, D].

    The batch axes are ordered (Hkv, B) rather than (B, Hkv) so the G query heads of one KV head share
    its K/V without repeating them.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    if num_seqs == 0:
        return torch.empty_like(q)
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    slots, valid = context_slots(block_tables, seq_lens, block_size, max_seq_len)   # [B, S]

    def gather(cache: Tensor) -> Tensor:                                              # [Hkv, B, S, D]
        # index the contiguous slot axis: indexing a transposed view would copy the whole layer cache
        rows = cache.view(num_blocks * block_size, num_kv_heads, head_dim).index_select(0, slots.flatten())
        return rows.view(num_seqs, max_seq_len, num_kv_heads, head_dim).permute(2, 0, 1, 3).to(q.dtype)

    q4 = q.reshape(num_seqs, num_kv_heads, group, head_dim).transpose(0, 1)          # [Hkv, B, G, D]
    out = F.scaled_dot_product_attention(q4, gather(k_cache), gather(v_cache),
                                         attn_mask=valid[None, :, None, :], scale=scale)
    return out.transpose(0, 1).reshape(num_seqs, num_q_heads, head_dim)


def prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_len: int,
                      scale: float) -> Tensor:
    """One request's query rows q [L, Hq, D] (the last L of its seq_len positions) -> [L, Hq, D]."""
    num_q = q.shape[0]
    block_size = k_cache.shape[1]
    table = block_table[: -(-seq_len // block_size)].long()
    # SDPA's CPU flash kernel wants 4-D contiguous inputs; 3-D or strided ones fall to a path ~3x slower.
    keys = k_cache[table].flatten(0, 1)[:seq_len].transpose(0, 1).to(q.dtype).contiguous()[None]  # [1, Hkv, S, D]
    values = v_cache[table].flatten(0, 1)[:seq_len].transpose(0, 1).to(q.dtype).contiguous()[None]
    q_heads_first = q.transpose(0, 1).contiguous()[None]                                         # [1, Hq, L, D]
    if num_q == seq_len:
        # Nothing cached before the chunk: plain causal, SDPA's fastest path.
        out = F.scaled_dot_product_attention(q_heads_first, keys, values, is_causal=True, scale=scale,
                                             enable_gqa=True)
    else:
        # Query row j sits at position seq_len - L + j: causal aligned to the bottom-right corner.
        # Imported here: the module pulls in torch._dynamo (~0.7 s), which only this case needs.
        from torch.nn.attention.bias import causal_lower_right
        out = F.scaled_dot_product_attention(q_heads_first, keys, values, attn_mask=causal_lower_right(num_q, seq_len),
                                             scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


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
