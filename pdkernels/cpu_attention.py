"""Torch paths of paged attention: what pdserve runs on CPU (and any non-CUDA device).

Each request's KV is gathered from the paged cache and the math handed to torch without repeating K/V
per query head: decode views the G query heads of a KV head as G query rows (one SDPA call over whole
gathered blocks, or, for float32 batches of several requests, two bmm calls over K/V gathered
heads-first), prefill uses SDPA's enable_gqa.

Block table to gathered context (block_size 4, seq_len 10, max_seq_len 12, row [7, 2, 9, <garbage>]):

    table      7       | 2       | 9           the first ceil(max_seq_len / 4) entries; an entry past
    gathered  k7[0..3] | k2[0..3] | k9[0..3]    the request's last block reads block 0 instead
    positions  0 1 2 3 | 4 5 6 7 | 8 9 10 11   positions at or past seq_len are masked out
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from pdkernels import cpu_native


def context_blocks(block_tables: Tensor, seq_lens: Tensor, block_size: int, max_seq_len: int
                   ) -> tuple[Tensor, Tensor]:
    """The blocks holding each request's context: block_ids [B, nb] int64 with nb = ceil(max_seq_len /
    block_size), and valid [B, nb * block_size] (position < seq_len).

    Table entries of blocks wholly past a request's seq_len (which may hold anything) become block 0.
    """
    num_blocks = -(-max_seq_len // block_size)
    if num_blocks > block_tables.shape[1]:
        raise ValueError(f"block_tables has {block_tables.shape[1]} columns, max_seq_len {max_seq_len} needs "
                         f"{num_blocks} blocks of {block_size}")
    positions = torch.arange(num_blocks * block_size, device=block_tables.device)       # [S']
    valid = positions[None, :] < seq_lens.long()[:, None]                                # [B, S']
    used = valid[:, ::block_size]                                                        # [B, nb]
    return torch.where(used, block_tables[:, :num_blocks].long(), 0), valid


# From this many requests a float32 decode batch takes the bmm path: 1.2-1.35x faster than SDPA at 4-64
# requests x 256-1024 context on one core, about even or slower below (docs/kernels.md, "CPU").
BMM_MIN_SEQS = 4


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                     seq_lens: Tensor, scale: float, max_seq_len: int | None = None) -> Tensor:
    """One query token per request, the whole padded batch at once. q [B, Hq, D] -> [B, Hq, D].

    float32 runs pdserve's compiled kernel (pdkernels/cpu_native.py) where it is built. Otherwise two
    equivalent torch paths: float32 batches of BMM_MIN_SEQS or more requests gather K/V heads-first and
    run two batched matmuls (`_decode_bmm`); the rest gather whole blocks for one SDPA call, with the
    batch axes ordered (Hkv, B) rather than (B, Hkv) so the G query heads of one KV head share its K/V
    without repeating them.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if num_seqs == 0:
        return torch.empty_like(q)
    lib = cpu_native.library()
    if lib is not None and cpu_native.decode_attention_supported(q, k_cache, v_cache):
        return cpu_native.decode_attention(lib, q, k_cache, v_cache, block_tables, seq_lens, scale)
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    block_ids, valid = context_blocks(block_tables, seq_lens, block_size, max_seq_len)  # [B, nb], [B, S']
    if num_seqs >= BMM_MIN_SEQS and q.dtype == k_cache.dtype == v_cache.dtype == torch.float32:
        return _decode_bmm(q, k_cache, v_cache, block_ids, valid, scale)
    num_positions = valid.shape[1]

    def gather(cache: Tensor) -> Tensor:                                              # [Hkv, B, S', D]
        # Whole blocks as rows of a 2-D view: index_select copies each row with one memcpy there, while
        # on the 4-D layer view (an offset into the whole cache) it is up to 8x slower, and a gather from
        # a transposed view would copy the whole layer cache first.
        rows = cache.view(cache.shape[0], -1).index_select(0, block_ids.flatten())    # [B * nb, bs * Hkv * D]
        return rows.view(num_seqs, num_positions, num_kv_heads, head_dim).permute(2, 0, 1, 3).to(q.dtype)

    q4 = q.reshape(num_seqs, num_kv_heads, group, head_dim).transpose(0, 1)          # [Hkv, B, G, D]
    out = F.scaled_dot_product_attention(q4, gather(k_cache), gather(v_cache),
                                         attn_mask=valid[None, :, None, :], scale=scale)
    return out.transpose(0, 1).reshape(num_seqs, num_q_heads, head_dim)


def _decode_bmm(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_ids: Tensor, valid: Tensor,
                scale: float) -> Tensor:
    """Decode attention as q @ K^T, masked softmax, @ V with K/V gathered heads-first, so each (request,
    KV head) is one contiguous [S', D] matrix and both products are single bmm calls over B * Hkv.

    The cache viewed as rows of D elements, [num_blocks * block_size * Hkv, D]; the row of request b,
    KV head h, context position s (block_size 4, Hkv 2, block_ids[b] = [7, 2]):

        row = (block_ids[b, s // 4] * 4 + s % 4) * 2 + h
        s     0  1  2  3 |  4  5  6  7
        h=0  56 58 60 62 | 16 18 20 22        gathered [b, h, s, :]: contiguous in s
        h=1  57 59 61 63 | 17 19 21 23
    """
    num_seqs, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group, num_positions = num_q_heads // num_kv_heads, valid.shape[1]
    offsets = torch.arange(block_size, device=q.device)
    slots = (block_ids[:, :, None] * block_size + offsets).view(num_seqs, 1, num_positions)      # [B, 1, S']
    heads = torch.arange(num_kv_heads, device=q.device)[:, None]                                  # [Hkv, 1]
    rows = (slots * num_kv_heads + heads).flatten()                                              # [B * Hkv * S']

    def gather(cache: Tensor) -> Tensor:                                              # [B * Hkv, S', D]
        return cache.view(-1, head_dim).index_select(0, rows).view(num_seqs * num_kv_heads, num_positions,
                                                                   head_dim)

    keys, values = gather(k_cache), gather(v_cache)
    bias = torch.zeros(num_seqs, 1, num_positions, device=q.device).masked_fill_(~valid[:, None, :], float("-inf"))
    scores = torch.bmm(q.reshape(num_seqs * num_kv_heads, group, head_dim), keys.transpose(1, 2))  # [B Hkv, G, S']
    scores = scores.view(num_seqs, num_q_heads, num_positions).mul_(scale).add_(bias)            # [B, Hq, S']
    probs = scores.softmax(dim=-1).view(num_seqs * num_kv_heads, group, num_positions)
    return torch.bmm(probs, values).view(num_seqs, num_q_heads, head_dim)


def prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_len: int,
                      scale: float) -> Tensor:
    """One request's query rows q [L, Hq, D] (the last L of its seq_len positions) -> [L, Hq, D]."""
    num_q = q.shape[0]
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    table = block_table[: -(-seq_len // block_size)].long()

    def gather(cache: Tensor) -> Tensor:                                                     # [1, Hkv, S, D]
        # Whole blocks as rows of a 2-D view (see decode_attention). SDPA's CPU flash kernel wants 4-D
        # contiguous inputs; 3-D or strided ones fall to a path ~3x slower.
        rows = cache.view(num_blocks, -1).index_select(0, table).view(-1, num_kv_heads, head_dim)
        return rows[:seq_len].transpose(0, 1).to(q.dtype).contiguous()[None]

    keys, values = gather(k_cache), gather(v_cache)
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
