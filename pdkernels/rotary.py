"""Rotary-embedding tables: the cos/sin cache that `pdkernels.ops.rotary_embedding` reads.

The inverse frequencies follow transformers' rope init (`transformers.modeling_rope_utils`) operation for
operation, so a model run with this cache matches the HF model numerically.
"""

import math

import torch
from torch import Tensor

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def compute_inv_freq(rot_dim: int, base: float, rope_scaling: dict | None = None) -> Tensor:
    """Inverse frequencies [rot_dim // 2] float32 for the given HF `rope_scaling` dict."""
    if rot_dim <= 0 or rot_dim % 2 != 0:
        raise ValueError(f"rot_dim must be a positive even number, got {rot_dim}")
    if base <= 0:
        raise ValueError(f"rope base (rope_theta) must be positive, got {base}")
    # Same expression as transformers, int64 arange cast to float32, so the bits agree.
    exponents = torch.arange(0, rot_dim, 2, dtype=torch.int64).to(dtype=torch.float) / rot_dim
    inv_freq = 1.0 / (base**exponents)
    rope_type = _rope_type(rope_scaling)
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(_require(rope_scaling, "factor", rope_type))
    return _llama3_inv_freq(inv_freq, rope_scaling)


def compute_cos_sin_cache(rot_dim: int, max_position: int, base: float,
                          rope_scaling: dict | None = None) -> Tensor:
    """Cos/sin table [max_position, rot_dim] float32: cos in [:, :rot_dim//2], sin in [:, rot_dim//2:].

    rope_scaling is the `rope_scaling` (or `rope_parameters`) dict of an HF config.json: None or
    {"rope_type": "default"}, {"rope_type" (or "type"): "linear", "factor"}, or {"rope_type": "llama3",
    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}.
    """
    if max_position <= 0:
        raise ValueError(f"max_position must be positive, got {max_position}")
    inv_freq = compute_inv_freq(rot_dim, base, rope_scaling)            # [rot_dim // 2]
    positions = torch.arange(max_position, dtype=torch.int64).float()   # [max_position]
    freqs = positions[:, None] * inv_freq[None, :]                      # [max_position, rot_dim // 2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).contiguous()


def _rope_type(rope_scaling: dict | None) -> str:
    if rope_scaling is None:
        return "default"
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_scaling type {rope_type!r}: supported types are {list(SUPPORTED_ROPE_TYPES)}"
            " (set rope_scaling to None for plain RoPE)")
    return rope_type


def _require(rope_scaling: dict, key: str, rope_type: str):
    if key not in rope_scaling:
        raise ValueError(f"rope_scaling of type {rope_type!r} needs the key {key!r}; got {rope_scaling}")
    return rope_scaling[key]


def _llama3_inv_freq(inv_freq: Tensor, rope_scaling: dict) -> Tensor:
    factor, low_freq_factor, high_freq_factor, old_context_len = (
        _require(rope_scaling, key, "llama3") for key in _LLAMA3_KEYS)
    if high_freq_factor == low_freq_factor:
        raise ValueError("llama3 rope_scaling needs high_freq_factor != low_freq_factor")
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, the band between
    # them interpolated smoothly: Llama 3.1's context extension.
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)
