"""What two peers must agree on before raw KV bytes mean the same thing on both sides."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from kvcache.layout import KVCacheLayout
from kvcache.transfer._proto import kv_transfer_pb2 as pb


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
    """What one TP rank's peer must agree on: its `KVCacheLayout` (kvcache/layout.py) plus the model's
    fingerprint. num_blocks is deliberately absent: each side sizes its own pool.
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
        try:
            self.cache_layout  # validates every field
        except ValueError as e:
            raise ValueError(f"invalid KVLayout: {e}") from None

    @classmethod
    def from_cache_layout(cls, layout: KVCacheLayout, model_fingerprint: str) -> KVLayout:
        return cls(model_fingerprint, layout.dtype, layout.block_size, layout.num_layers, layout.num_kv_heads,
                   layout.head_dim, layout.tp_size, layout.tp_rank)

    @classmethod
    def from_kv_cache(cls, kv_cache: torch.Tensor, model_fingerprint: str, tp_size: int = 1,
                      tp_rank: int = 0) -> KVLayout:
        return cls.from_cache_layout(KVCacheLayout.of(kv_cache, tp_size, tp_rank), model_fingerprint)

    @functools.cached_property
    def cache_layout(self) -> KVCacheLayout:
        return KVCacheLayout(self.num_layers, self.num_kv_heads, self.head_dim, self.block_size, self.dtype,
                             self.tp_size, self.tp_rank)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """One block of one layer's K (or V): [block_size, Hkv, D]."""
        return self.cache_layout.block_shape

    @property
    def num_bytes_per_layer_block(self) -> int:
        """K and V of one block in one layer."""
        return self.cache_layout.bytes_per_layer_block

    def num_blocks_for(self, num_tokens: int) -> int:
        return self.cache_layout.num_blocks_for_tokens(num_tokens)

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
