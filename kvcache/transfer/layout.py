"""What two peers must agree on before raw KV bytes mean the same thing on both sides."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from kvcache.layout import KVCacheLayout, check_partition, even_partition, stage_layers
from kvcache.transfer._proto import kv_transfer_pb2 as pb


class IncompatibleLayoutError(ValueError):
    """The peers' KV layouts differ; `differences` lists 'field: ours=.. theirs=..' per field."""

    def __init__(self, differences: list[str]) -> None:
        self.differences = differences
        super().__init__("incompatible KV layout between prefill and decode peers: "
                         + "; ".join(differences)
                         + ". Serve the same model with the same dtype and --block-size on both sides "
                           "(their tensor-parallel sizes may differ)")


# Fields that describe a side's tensor-parallel plan: they may differ between the peers (the sender
# converts, kvcache/transfer/plans.py); every other field must be equal.
PLAN_FIELDS = ("num_kv_heads", "tp_size", "tp_rank", "pp_size", "pp_partition")


@dataclass(frozen=True)
class KVLayout:
    """What an instance declares to its KV peers: the `KVCacheLayout` of its rank tp_rank (every rank
    holds as many heads; the instance's endpoint declares rank 0) with the model's num_layers, its
    pipeline stages and their layers (pp_partition; empty: the even split), plus the model's
    fingerprint. Rank r = stage * tp_size + TP rank holds its stage's layers (`rank_layers`).
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
    total_kv_heads: int = 0  # the model's; 0: num_kv_heads * tp_size
    pp_size: int = 1
    pp_partition: tuple[int, ...] = ()  # layers per stage; () : even_partition(num_layers, pp_size)

    def __post_init__(self) -> None:
        if self.total_kv_heads == 0:
            object.__setattr__(self, "total_kv_heads", self.num_kv_heads * self.tp_size)
        try:
            object.__setattr__(self, "pp_partition", tuple(self.pp_partition)
                               or even_partition(self.num_layers, self.pp_size))
            check_partition(self.pp_partition, self.num_layers, self.pp_size)
            self.cache_layout  # validates every field
        except ValueError as e:
            raise ValueError(f"invalid KVLayout: {e}") from None

    @classmethod
    def from_cache_layout(cls, layout: KVCacheLayout, model_fingerprint: str,
                          pp_partition: tuple[int, ...] = ()) -> KVLayout:
        """pp_partition: the pipeline stages' layers, where layout is one stage's."""
        return cls(model_fingerprint, layout.dtype, layout.block_size, sum(pp_partition) or layout.num_layers,
                   layout.num_kv_heads, layout.head_dim, layout.tp_size, layout.tp_rank, layout.total_kv_heads,
                   len(pp_partition) or 1, tuple(pp_partition))

    @classmethod
    def from_kv_cache(cls, kv_cache: torch.Tensor, model_fingerprint: str, tp_size: int = 1,
                      tp_rank: int = 0) -> KVLayout:
        return cls.from_cache_layout(KVCacheLayout.of(kv_cache, tp_size, tp_rank), model_fingerprint)

    @functools.cached_property
    def cache_layout(self) -> KVCacheLayout:
        """Rank tp_rank's heads over all num_layers: a one-stage instance's cache (with pipeline stages,
        each rank's is `rank_cache_layout(rank)`); its per-block sizes hold for every rank."""
        return KVCacheLayout(self.num_layers, self.num_kv_heads, self.head_dim, self.block_size, self.dtype,
                             self.tp_size, self.tp_rank, self.total_kv_heads)

    @property
    def world_size(self) -> int:
        """Ranks of the instance, each with a cache of its own."""
        return self.tp_size * self.pp_size

    def rank_layers(self, rank: int) -> tuple[int, int]:
        """The model's layers [first, end) whose KV rank `rank` holds (its pipeline stage's)."""
        return stage_layers(self.pp_partition, rank // self.tp_size)

    def rank_cache_layout(self, rank: int) -> KVCacheLayout:
        """The KVCacheLayout of rank `rank`'s cache: its stage's layers, its TP rank's heads."""
        return self.cache_layout.for_rank(rank % self.tp_size).stage_slice(self.pp_partition,
                                                                             rank // self.tp_size)

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
        try:
            self.cache_layout.check(kv_cache)
        except ValueError as e:
            raise ValueError(f"kv_cache does not match the declared layout: {e}") from None

    def check_caches(self, kv_caches: list[torch.Tensor]) -> None:
        """Raise ValueError unless kv_caches holds one cache per rank, each of its rank's layout, all of
        as many blocks (rank r's at index r: one block table serves them all)."""
        if len(kv_caches) != self.world_size:
            raise ValueError(f"{len(kv_caches)} KV caches for {self.world_size} ranks ({self.tp_size} tensor-parallel "
                             f"x {self.pp_size} pipeline stages)")
        for rank, kv_cache in enumerate(kv_caches):
            if not kv_cache.is_contiguous():
                raise ValueError("kv_cache must be contiguous for KV transfer")
            try:
                self.rank_cache_layout(rank).check(kv_cache)
            except ValueError as e:
                raise ValueError(f"rank {rank}'s kv_cache does not match the declared layout: {e}") from None
            if kv_cache.shape[2] != kv_caches[0].shape[2]:
                raise ValueError(f"the ranks' KV caches hold different numbers of blocks: "
                                 f"{[c.shape[2] for c in kv_caches]}")

    def differences(self, other: KVLayout, ours: str = "ours", theirs: str = "theirs") -> list[str]:
        """'field: ours=X theirs=Y' for each field that differs; [] when identical."""
        return [f"{f.name}: {ours}={getattr(self, f.name)!r} {theirs}={getattr(other, f.name)!r}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    def incompatibilities(self, other: KVLayout, ours: str = "ours", theirs: str = "theirs") -> list[str]:
        """differences() in what must match: the model, dtype, block size, layers, heads and head size.
        The tensor-parallel plan (PLAN_FIELDS) may differ: the sender converts it."""
        return [d for d in self.differences(other, ours, theirs) if d.split(":", 1)[0] not in PLAN_FIELDS]

    def check_compatible(self, other: KVLayout, ours: str = "ours", theirs: str = "theirs") -> None:
        """Raise IncompatibleLayoutError naming every field that differs and must not."""
        differences = self.incompatibilities(other, ours, theirs)
        if differences:
            raise IncompatibleLayoutError(differences)

    def to_proto(self) -> pb.KVLayout:
        return pb.KVLayout(**dataclasses.asdict(self))

    @classmethod
    def from_proto(cls, message: pb.KVLayout) -> KVLayout:
        fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(cls)}
        return cls(**fields | {"pp_partition": tuple(message.pp_partition)})
