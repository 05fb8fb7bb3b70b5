"""pdserve kernels: Triton kernels for CUDA, torch paths for CPU, and the torch references both match.

Imports nothing from the rest of the project.
"""

from pdkernels.ops import (
    pack_kv,
    paged_attention,
    paged_decode_attention,
    rms_norm,
    rotary_embedding,
    silu_and_mul,
    unpack_kv,
    write_kv,
)
from pdkernels.rotary import compute_cos_sin_cache

__all__ = [
    "compute_cos_sin_cache",
    "pack_kv",
    "paged_attention",
    "paged_decode_attention",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "unpack_kv",
    "write_kv",
]
