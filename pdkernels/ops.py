"""Dispatching entry points of the kernels package.

Each op runs its Triton kernel when the tensors live on CUDA, pdserve's compiled CPU kernel for float32
on CPU where it is built (pdkernels/cpu_native.py), and a torch path otherwise; all are tested against
the loop definitions in `pdkernels.reference`. The Triton modules are imported only on the CUDA
branch, so CPU serving never loads (or JIT-compiles) the Triton kernels.

KV cache layout used throughout: kv_cache [num_layers, 2, num_blocks, block_size, Hkv, D]; the per-layer
k_cache / v_cache are kv_cache[l, 0] / kv_cache[l, 1], each [num_blocks, block_size, Hkv, D]; a slot is
block_id * block_size + offset.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from pdkernels import cpu_attention, cpu_native
from pdkernels.checks import check_attention_inputs


def _native(*tensors: Tensor):
    """pdserve's CPU kernel library when every tensor is float32 on the CPU and it is built, else None."""
    if cpu_native.float32_cpu(*tensors):
        return cpu_native.library()
    return None


def silu_and_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for gate_up [..., 2I] (gate first, as a fused gate_up projection gives) -> [..., I]."""
    lib = _native(gate_up)
    if lib is not None:
        return cpu_native.silu_and_mul(lib, gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
             ) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm of x [T, H] times weight [H], computed in float32, returned in x.dtype.

    With residual: s = x + residual (rounded to x.dtype, as the HF models do); returns
    (rms_norm(s) * weight, s), vLLM's fused_add_rms_norm. Inputs are not modified.
    """
    if x.is_cuda:
        from pdkernels import triton_norm
        return triton_norm.rms_norm(x, weight, eps, residual)
    lib = _native(x, weight, *([residual] if residual is not None else []))
    if lib is not None:
        return cpu_native.rms_norm(lib, x, weight, eps, residual)
    if residual is not None:
        summed = x + residual if x.dtype == torch.float32 else (x.float() + residual.float()).to(x.dtype)
        return _rms_norm_torch(summed, weight, eps), summed
    return _rms_norm_torch(x, weight, eps)


def _rms_norm_torch(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    if x.dtype == weight.dtype == torch.float32:
        # one call instead of six: the same float32 ops, bit for bit, with less per-op overhead
        return torch.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()
    inv_rms = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)     # [T, 1]
    return (x32 * inv_rms * weight.float()).to(x.dtype)


def rotary_embedding(positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor,
                     is_neox: bool = True) -> tuple[Tensor, Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] by the angles of positions [T] int64; new tensors back.

    cos_sin_cache [max_pos, rot_dim] float32 (see pdkernels.rotary); rot_dim <= D, and only the first
    rot_dim dims are rotated (partial rotary). Neox style rotates halves; GPT-J style (is_neox=False)
    rotates interleaved pairs.
    """
    if q.is_cuda:
        from pdkernels import triton_norm
        return triton_norm.rotary_embedding(positions, q, k, cos_sin_cache, is_neox)
    lib = _native(q, k, cos_sin_cache)
    if lib is not None and q.dim() == k.dim() == 3:
        return cpu_native.rotary_embedding(lib, positions, q, k, cos_sin_cache, is_neox)
    cos_sin = cos_sin_cache.index_select(0, positions.long())              # [T, rot_dim]
    half = cos_sin.shape[1] // 2
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]            # [T, 1, rot_dim/2]
    return _rotate(q, cos, sin, is_neox), _rotate(k, cos, sin, is_neox)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, is_neox: bool) -> Tensor:
    rot_dim = 2 * cos.shape[-1]
    x32 = x[..., :rot_dim].float()
    if is_neox:
        x1, x2 = x32.chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    else:
        x1, x2 = x32[..., 0::2], x32[..., 1::2]
        rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2).to(x.dtype)
    if rot_dim == x.shape[-1]:
        return rotated
    return torch.cat([rotated, x[..., rot_dim:]], dim=-1)       # partial rotary: the rest passes through


def write_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Store key/value [T, Hkv, D] at slot_mapping [T] of k_cache/v_cache in place; slot < 0 skips."""
    if key.is_cuda:
        from pdkernels import triton_cache
        triton_cache.write_kv(key, value, k_cache, v_cache, slot_mapping)
        return
    lib = _native(key, value, k_cache, v_cache)
    if lib is not None and k_cache.is_contiguous() and v_cache.is_contiguous():
        cpu_native.write_kv(lib, key, value, k_cache, v_cache, slot_mapping)
        return
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[keep], value[keep]
    # view (not reshape) so a non-contiguous cache fails loudly instead of writing into a copy.
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value.to(v_cache.dtype))


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                    query_start_loc: Tensor, scale: float, max_query_len: int | None = None,
                    max_seq_len: int | None = None) -> Tensor:
    """Varlen causal attention over the paged cache for a mixed batch of prefill chunks and decodes.

    q [T, Hq, D]: request b owns rows query_start_loc[b]:query_start_loc[b+1] (q_len_b, may be 0).
    seq_lens [B] int32 counts the request's whole context including its q_len_b new tokens, whose K/V
    are already in the cache; query row j sits at position seq_lens[b] - q_len_b + j and attends to
    cache positions 0..that position. block_tables [B, max_blocks] int32 (entries past the request's
    blocks may hold anything). Query head h reads KV head h // (Hq // Hkv). Returns [T, Hq, D].
    """
    check_attention_inputs(q, k_cache, v_cache)
    num_seqs = seq_lens.shape[0]
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max()) if num_seqs else 0
    if max_query_len == 1 and q.shape[0] == num_seqs:
        return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len)
    if q.is_cuda:
        from pdkernels import triton_attention
        return triton_attention.paged_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                                query_start_loc, scale, max_query_len, max_seq_len)
    return cpu_attention.varlen_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                          scale)


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           seq_lens: Tensor, scale: float, max_seq_len: int | None = None,
                           num_splits: int | None = None) -> Tensor:
    """One new token per request: q [B, Hq, D] -> [B, Hq, D] over seq_lens[b] cached positions.

    On CUDA the context is split into num_splits parts (chosen from the batch size when None) whose
    partial softmax results are reduced by a second kernel; the CPU path ignores num_splits.
    """
    if q.is_cuda:
        from pdkernels import triton_attention
        return triton_attention.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                                       max_seq_len, num_splits)
    return cpu_attention.decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len)


def pack_kv(kv_cache: Tensor, block_ids: Tensor, layer_start: int = 0, layer_end: int | None = None,
            out: Tensor | None = None) -> Tensor:
    """Gather blocks block_ids [n] of layers [layer_start, layer_end) into one contiguous buffer.

    Returns (or fills) out [layer_end - layer_start, 2, n, block_size, Hkv, D]: the unit that KV transfer
    and swapping move. block_ids may be in any order. With a GPU cache, out may be in host memory (a
    wire payload, a shared-memory slab): the blocks are gathered on the GPU and copied there, and out is
    filled when this returns.
    """
    layer_end = kv_cache.shape[0] if layer_end is None else layer_end
    if not 0 <= layer_start < layer_end <= kv_cache.shape[0]:
        raise ValueError(f"layer range [{layer_start}, {layer_end}) is outside the cache's "
                         f"{kv_cache.shape[0]} layers")
    if kv_cache.is_cuda:
        from pdkernels import triton_cache
        with torch.cuda.device(kv_cache.device):  # the cache's GPU, whichever is current
            block_ids = block_ids.to(kv_cache.device)
            if out is None or out.device == kv_cache.device:
                return triton_cache.pack_kv(kv_cache, block_ids, layer_start, layer_end, out)
            return out.copy_(triton_cache.pack_kv(kv_cache, block_ids, layer_start, layer_end))
    layers = kv_cache[layer_start:layer_end]
    if out is None:
        return layers.index_select(2, block_ids.long())
    return torch.index_select(layers, 2, block_ids.long(), out=out)


def unpack_kv(buffer: Tensor, kv_cache: Tensor, block_ids: Tensor, layer_start: int = 0) -> None:
    """Inverse of pack_kv: scatter buffer [L', 2, n, block_size, Hkv, D] into kv_cache in place. With a GPU
    cache, buffer may be in host memory: it is copied to the GPU first (before this returns, so the
    caller may reuse it)."""
    layer_end = layer_start + buffer.shape[0]
    if not 0 <= layer_start < layer_end <= kv_cache.shape[0]:
        raise ValueError(f"buffer of {buffer.shape[0]} layers at layer_start {layer_start} does not fit "
                         f"the cache's {kv_cache.shape[0]} layers")
    if kv_cache.is_cuda:
        from pdkernels import triton_cache
        with torch.cuda.device(kv_cache.device):
            triton_cache.unpack_kv(buffer.to(kv_cache.device), kv_cache, block_ids.to(kv_cache.device), layer_start)
        return
    kv_cache[layer_start:layer_end].index_copy_(2, block_ids.long(), buffer.to(kv_cache.dtype))
