"""Triton kernels that move KV: write new tokens into the paged cache, and pack / unpack whole blocks
of one or more layers to and from one contiguous buffer (the unit KV transfer and swapping send).

pack layout (2 layers, block_ids [5, 2]):

    kv_cache [L, 2, num_blocks, block_size, Hkv, D]        buffer [2, 2, 2, block_size, Hkv, D]
      (l0, K) blocks ... 2 ... 5 ...          ->             (l0, K) [blk5 | blk2]
      (l0, V) blocks ... 2 ... 5 ...          ->             (l0, V) [blk5 | blk2]
      (l1, K) ...                                            (l1, K) ...
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

_COPY_BLOCK = 2048          # elements per program iteration when copying one KV block


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, block_size,
                     stride_key, stride_value, stride_k_block, stride_k_offset, stride_v_block,
                     stride_v_offset, ROW: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block_id = slot // block_size
    offset = slot % block_size
    for start in range(0, ROW, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < ROW
        key = tl.load(key_ptr + token * stride_key + cols, mask=mask)
        value = tl.load(value_ptr + token * stride_value + cols, mask=mask)
        tl.store(k_cache_ptr + block_id * stride_k_block + offset * stride_k_offset + cols,
                 key.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + block_id * stride_v_block + offset * stride_v_offset + cols,
                 value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Same contract as pdkernels.ops.write_kv. Each cache slot row [Hkv, D] must be contiguous."""
    num_tokens, num_kv_heads, head_dim = key.shape
    row = num_kv_heads * head_dim
    for name, t in (("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1 or t.stride(-2) != head_dim:
            raise ValueError(f"write_kv needs {name}'s [Hkv, D] rows contiguous; call .contiguous()")
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping.contiguous(), k_cache.shape[1],
        key.stride(0), value.stride(0), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
        v_cache.stride(1), ROW=row, BLOCK=min(triton.next_power_of_2(row), 1024))


@triton.jit
def _copy_blocks_kernel(cache_ptr, buffer_ptr, block_ids_ptr, num_ids, stride_layer, stride_kv,
                        stride_block, BLOCK_NUMEL: tl.constexpr, BLOCK: tl.constexpr,
                        TO_BUFFER: tl.constexpr):
    """Program (i, plane) copies block block_ids[i] of plane (layer, k/v) = divmod(plane, 2)."""
    i = tl.program_id(0).to(tl.int64)
    plane = tl.program_id(1).to(tl.int64)
    block_id = tl.load(block_ids_ptr + i).to(tl.int64)
    cache_base = cache_ptr + (plane // 2) * stride_layer + (plane % 2) * stride_kv + block_id * stride_block
    buffer_base = buffer_ptr + (plane * num_ids + i) * BLOCK_NUMEL
    for start in range(0, BLOCK_NUMEL, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < BLOCK_NUMEL
        if TO_BUFFER:
            tl.store(buffer_base + cols, tl.load(cache_base + cols, mask=mask), mask=mask)
        else:
            tl.store(cache_base + cols, tl.load(buffer_base + cols, mask=mask), mask=mask)


def _check_block_layout(kv_cache: Tensor) -> int:
    """Number of elements of one KV block; the kernel copies it as one flat run."""
    block_numel = kv_cache[0, 0, 0].numel()
    if not kv_cache[0, 0, 0].is_contiguous() or kv_cache.stride(2) < block_numel:
        raise ValueError("pack/unpack need each [block_size, Hkv, D] block of kv_cache contiguous")
    return block_numel


def pack_kv(kv_cache: Tensor, block_ids: Tensor, layer_start: int, layer_end: int,
            out: Tensor | None = None) -> Tensor:
    """Same contract as pdkernels.ops.pack_kv (layer_end already resolved)."""
    num_layers = layer_end - layer_start
    shape = (num_layers, 2, block_ids.shape[0], *kv_cache.shape[3:])
    if out is None:
        out = torch.empty(shape, dtype=kv_cache.dtype, device=kv_cache.device)
    elif tuple(out.shape) != shape or not out.is_contiguous() or out.dtype != kv_cache.dtype:
        raise ValueError(f"pack_kv out must be a contiguous {kv_cache.dtype} tensor of shape {shape}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    _launch_copy(kv_cache, out, block_ids, layer_start, num_layers, to_buffer=True)
    return out


def unpack_kv(buffer: Tensor, kv_cache: Tensor, block_ids: Tensor, layer_start: int) -> None:
    """Same contract as pdkernels.ops.unpack_kv."""
    if not buffer.is_contiguous() or buffer.dtype != kv_cache.dtype:
        raise ValueError(f"unpack_kv needs a contiguous {kv_cache.dtype} buffer, got {buffer.dtype}")
    _launch_copy(kv_cache, buffer, block_ids, layer_start, buffer.shape[0], to_buffer=False)


def _launch_copy(kv_cache: Tensor, buffer: Tensor, block_ids: Tensor, layer_start: int, num_layers: int,
                 to_buffer: bool) -> None:
    block_numel = _check_block_layout(kv_cache)
    num_ids = block_ids.shape[0]
    if num_ids == 0 or num_layers == 0:
        return
    layers = kv_cache[layer_start:layer_start + num_layers]
    _copy_blocks_kernel[(num_ids, num_layers * 2)](
        layers, buffer, block_ids.contiguous(), num_ids, layers.stride(0), layers.stride(1),
        layers.stride(2), BLOCK_NUMEL=block_numel, BLOCK=min(_COPY_BLOCK, triton.next_power_of_2(block_numel)),
        TO_BUFFER=to_buffer)
