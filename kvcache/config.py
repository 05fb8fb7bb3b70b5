"""KV cache configuration."""
from __future__ import annotations

from dataclasses import dataclass

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_bytes(value: int | str) -> int:
    """'2GiB', '512MiB', '1e9', 1000000 -> bytes."""
    if isinstance(value, int):
        return value
    text = str(value).strip().lower().replace(" ", "")
    num = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(num):]
    if unit not in _UNITS or not num:
        raise ValueError(f"cannot read {value!r} as a size: use bytes or a suffix like 512MiB or 2GiB")
    return int(float(num) * _UNITS[unit])


DEFAULT_KV_CACHE_BYTES = 512 * 1024**2  # the KV pool's budget on CPU when none is given


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Memory for the KV pool (all layers, K and V; per rank). The number of blocks follows from it.
    # None: 512 MiB on CPU; on CUDA what --gpu-memory-utilization leaves (serving/runner/gpu_memory.py)
    kv_cache_memory_bytes: int | None = None
    # CUDA, when kv_cache_memory_bytes is not given: the share of the GPU's memory the instance may
    # take in all, its KV pool sized to fill it (vLLM's flag and default)
    gpu_memory_utilization: float = 0.9
    # Fix the number of blocks instead (tests, reproducing a run); overrides the budget when set.
    num_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    # host memory for swapped-out KV (GiB, vLLM's --swap-space); used with --preemption-mode swap only
    swap_space: float = 4.0
    # which free blocks a request gets: "lru" (single blocks, least recently freed first), "groups"
    # (runs of consecutive blocks: a swap copies one span per run), "auto" (groups when swapping)
    block_allocation: str = "auto"

    @property
    def kv_bytes(self) -> int:
        """The budget given, or the CPU default (on CUDA the engine sizes an unset one from the GPU)."""
        return DEFAULT_KV_CACHE_BYTES if self.kv_cache_memory_bytes is None else self.kv_cache_memory_bytes

    def __post_init__(self) -> None:
        if not self.swap_space > 0:
            raise ValueError(f"--swap-space must be a positive number of GiB, got {self.swap_space}")
        if self.block_allocation not in ("auto", "lru", "groups"):
            raise ValueError(f"--block-allocation must be one of auto, lru, groups, got {self.block_allocation!r}")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"--block-size must be a power of two in [1, 128], got {self.block_size}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError("--kv-cache-memory-bytes must be positive")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_blocks_override is not None and self.num_blocks_override < 1:
            raise ValueError("--num-gpu-blocks-override must be at least 1")
