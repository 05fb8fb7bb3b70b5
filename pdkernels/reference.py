"""Obviously-correct torch definitions of every kernel: loops over requests, tokens and heads, float64
math. They define what the Triton kernels and the torch paths in `pdkernels.ops` compute; the tests
compare both against these. Never used for serving.
"""

import torch
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
             ) -> Tensor | tuple[Tensor, Tensor]:
    summed = x if residual is None else (x.double() + residual.double()).to(x.dtype)
    s = summed.double()
    out = (s / torch.sqrt((s * s).mean(dim=-1, keepdim=True) + eps) * weight.double()).to(x.dtype)
    return out if residual is None else (out, summed)


def rotary_embedding(positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor,
                     is_neox: bool = True) -> tuple[Tensor, Tensor]:
    return (_rotate(positions, q, cos_sin_cache, is_neox), _rotate(positions, k, cos_sin_cache, is_neox))


def _rotate(positions: Tensor, x: Tensor, cos_sin_cache: Tensor, is_neox: bool) -> Tensor:
    rot_dim = cos_sin_cache.shape[1]
    half = rot_dim // 2
    out = x.clone()
    for t in range(x.shape[0]):
        cos = cos_sin_cache[positions[t], :half].double()
        sin = cos_sin_cache[positions[t], half:].double()
        for h in range(x.shape[1]):
            v = x[t, h, :rot_dim].double()
            # Pairs (i, i + half) for neox, (2i, 2i + 1) for GPT-J; each pair turns by angle i.
            first, second = (torch.arange(half), torch.arange(half) + half) if is_neox else (
                torch.arange(0, rot_dim, 2), torch.arange(1, rot_dim, 2))
            rotated = v.clone()
            rotated[first] = v[first] * cos - v[second] * sin
            rotated[second] = v[second] * cos + v[first] * sin
            out[t, h, :rot_dim] = rotated.to(x.dtype)
    return out


def write_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_cache[slot // block_size, slot % block_size] = key[t]
            v_cache[slot // block_size, slot % block_size] = value[t]


def _context(cache: Tensor, block_table: Tensor, seq_len: int) -> Tensor:
    """The request's first seq_len cached tokens [seq_len, Hkv, D] in float64, read slot by slot."""
    block_size = cache.shape[1]
    rows = [cache[int(block_table[pos // block_size]), pos % block_size] for pos in range(seq_len)]
    return torch.stack(rows).double() if rows else cache.new_zeros((0, *cache.shape[2:])).double()


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                    query_start_loc: Tensor, scale: float) -> Tensor:
    num_q_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.zeros_like(q)
    for b in range(seq_lens.shape[0]):
        start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        seq_len = int(seq_lens[b])
        keys = _context(k_cache, block_tables[b], seq_len)
        values = _context(v_cache, block_tables[b], seq_len)
        for j in range(end - start):
            position = seq_len - (end - start) + j
            for h in range(num_q_heads):
                kv_head = h // group
                scores = keys[: position + 1, kv_head] @ q[start + j, h].double() * scale
                probs = torch.softmax(scores, dim=0)
                out[start + j, h] = (probs @ values[: position + 1, kv_head]).to(q.dtype)
    return out


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           seq_lens: Tensor, scale: float) -> Tensor:
    query_start_loc = torch.arange(q.shape[0] + 1)
    return paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)


def pack_kv(kv_cache: Tensor, block_ids: Tensor, layer_start: int = 0, layer_end: int | None = None
            ) -> Tensor:
    layer_end = kv_cache.shape[0] if layer_end is None else layer_end
    return torch.stack([kv_cache[layer_start:layer_end, :, int(b)] for b in block_ids], dim=2)


def unpack_kv(buffer: Tensor, kv_cache: Tensor, block_ids: Tensor, layer_start: int = 0) -> None:
    for i, block_id in enumerate(block_ids.tolist()):
        kv_cache[layer_start:layer_start + buffer.shape[0], :, block_id] = buffer[:, :, i]
