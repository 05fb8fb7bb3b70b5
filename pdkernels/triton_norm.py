"""Triton kernels for the per-token elementwise ops: fused (residual-add) RMSNorm and rotary embedding.

Both are memory-bound: one program per token reads its row once and writes it once.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, summed_ptr, hidden_size, eps,
                     stride_x, stride_residual, stride_out, stride_summed,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        # Round the sum to the activation dtype before normalising, as the HF models do.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(summed_ptr + row * stride_summed + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / hidden_size + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (x32 * inv_rms * weight).to(out_ptr.dtype.element_ty),
             mask=mask)


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
             ) -> Tensor | tuple[Tensor, Tensor]:
    """Same contract as pdkernels.ops.rms_norm; x [T, H] with unit stride along H."""
    num_tokens, hidden_size = x.shape
    if x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("rms_norm needs x and residual contiguous along the hidden dim; call .contiguous()")
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else out
    residual_arg = residual if residual is not None else x
    block = triton.next_power_of_2(hidden_size)
    if num_tokens > 0:
        _rms_norm_kernel[(num_tokens,)](
            x, residual_arg, weight.contiguous(), out, summed, hidden_size, eps,
            x.stride(0), residual_arg.stride(0), out.stride(0), summed.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return out if residual is None else (out, summed)


@triton.jit
def _rotary_kernel(positions_ptr, x_ptr, cos_sin_ptr, num_heads, stride_token, stride_head, stride_cos_sin,
                   HALF: tl.constexpr, IS_NEOX: tl.constexpr, BLOCK_HEADS: tl.constexpr,
                   BLOCK_HALF: tl.constexpr):
    """Rotates x[token, :, :2*HALF] in place (x is already a copy of the caller's tensor)."""
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    pair = tl.arange(0, BLOCK_HALF)
    heads = tl.arange(0, BLOCK_HEADS)
    pair_mask = pair < HALF
    cos = tl.load(cos_sin_ptr + position * stride_cos_sin + pair, mask=pair_mask, other=0.0)
    sin = tl.load(cos_sin_ptr + position * stride_cos_sin + HALF + pair, mask=pair_mask, other=0.0)
    # Pair i is (i, i + HALF) in neox style and (2i, 2i + 1) in GPT-J style.
    if IS_NEOX:
        first = pair
        second = pair + HALF
    else:
        first = 2 * pair
        second = 2 * pair + 1
    mask = (heads[:, None] < num_heads) & pair_mask[None, :]
    row = x_ptr + token * stride_token + heads[:, None] * stride_head
    x1 = tl.load(row + first[None, :], mask=mask, other=0.0)
    x2 = tl.load(row + second[None, :], mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    tl.store(row + first[None, :], (x1f * cos[None, :] - x2f * sin[None, :]).to(x1.dtype), mask=mask)
    tl.store(row + second[None, :], (x2f * cos[None, :] + x1f * sin[None, :]).to(x1.dtype), mask=mask)


def rotary_embedding(positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor,
                     is_neox: bool = True) -> tuple[Tensor, Tensor]:
    """Same contract as pdkernels.ops.rotary_embedding; returns new (q, k)."""
    rot_dim = cos_sin_cache.shape[1]
    if rot_dim > q.shape[-1] or rot_dim % 2 != 0:
        raise ValueError(f"cos_sin_cache rot_dim {rot_dim} must be even and <= head_dim {q.shape[-1]}")
    cos_sin = cos_sin_cache.float().contiguous()
    positions = positions.contiguous()
    outputs = []
    for x in (q, k):
        out = x.contiguous().clone()                                     # [T, H, D]
        if out.shape[0] > 0:
            _rotary_kernel[(out.shape[0],)](
                positions, out, cos_sin, out.shape[1], out.stride(0), out.stride(1), cos_sin.stride(0),
                HALF=rot_dim // 2, IS_NEOX=is_neox, BLOCK_HEADS=triton.next_power_of_2(out.shape[1]),
                BLOCK_HALF=triton.next_power_of_2(rot_dim // 2))
        outputs.append(out)
    return outputs[0], outputs[1]
