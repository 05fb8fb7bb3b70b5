"""What two peers must agree on before raw KV bytes mean the same thing on both sides."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvcache.transfer._proto import kv_transfer_pb2 as pb

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


class IncompatibleLayoutError(ValueError):
    """The peers' KV layouts differ; `differences` lists 'field: ours=.. theirs=..' per field."""

    def __init__(self, differences: list[str]) -> None:
        self.differences = differences
        super().__init__("incompatible KV layout between prefill and decode peers: "
                         + "; ".join(differences)
                         + ". Serve the same model with the same dtype, --block-size and parallelism "
                           "on both sides")


@dataclass(frozen=True)
class KVLayout:
    """The layout of one TP rank's kv_cache [num_layers, 2, num_blocks, block_size, Hkv, head_dim].

    num_blocks is deliberately absent: each side sizes its own pool.
    """
    model_fingerprint: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tp_size: int = 1
    tp_rank: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"KV dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim", "tp_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVLayout.{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"KVLayout.tp_rank must be in [0, tp_size={self.tp_size}), got {self.tp_rank}")

    @classmethod
    def from_kv_cache(cls, kv_cache: torch.Tensor, model_fingerprint: str, tp_size: int = 1,
                      tp_rank: int = 0) -> KVLayout:
        num_layers, two, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        if two != 2:
            raise ValueError(f"kv_cache must be [num_layers, 2, num_blocks, block_size, Hkv, D], got "
                             f"shape {tuple(kv_cache.shape)}")
        return cls(model_fingerprint, str(kv_cache.dtype).removeprefix("torch."), block_size, num_layers,
                   num_kv_heads, head_dim, tp_size, tp_rank)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """One block of one layer's K (or V): [block_size, Hkv, D]."""
        return (self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def num_bytes_per_layer_block(self) -> int:
        """K and V of one block in one layer."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.torch_dtype.itemsize

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def check_cache(self, kv_cache: torch.Tensor) -> None:
        """Raise ValueError unless kv_cache is contiguous with exactly this layout."""
        if not kv_cache.is_contiguous():
            raise ValueError("kv_cache must be contiguous for KV transfer")
        own = KVLayout.from_kv_cache(kv_cache, self.model_fingerprint, self.tp_size, self.tp_rank)
        if own != self:
            raise ValueError(f"kv_cache does not match the declared layout: {'; '.join(self.differences(own))}")

    def differences(self, other: KVLayout, ours: str = "ours", theirs: str = "theirs") -> list[str]:
        """'field: ours=X theirs=Y' for each field that differs; [] when identical."""
        return [f"{f.name}: {ours}={getattr(self, f.name)!r} {theirs}={getattr(other, f.name)!r}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    def check_compatible(self, other: KVLayout, ours: str = "ours", theirs: str = "theirs") -> None:
        """Raise IncompatibleLayoutError naming every differing field with both values.

        Every field must be equal: the transfer moves raw blocks, and converting between TP plans is
        a separate (future) transform, not something to do silently.
        """
        differences = self.differences(other, ours, theirs)
        if differences:
            raise IncompatibleLayoutError(differences)

    def to_proto(self) -> pb.KVLayout:
        return pb.KVLayout(**dataclasses.asdict(self))

    @classmethod
    def from_proto(cls, message: pb.KVLayout) -> KVLayout:
        return cls(**{f.name: getattr(message, f.name) for f in dataclasses.fields(cls)})
