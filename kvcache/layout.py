"""The layout of the KV cache tensors: the one place that defines them.

The model runner allocates the cache from it, the KV transfer layer moves raw blocks of it, and the
simulator sizes pools from it without allocating anything:

    kv_cache [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
              layer     K|V  block id    slot        head           dim

One block of one layer, K and V, is the unit of transfer and swapping (`bytes_per_layer_block`).

Tensor parallelism shards the KV heads: rank r of tp holds heads [r*H/tp, (r+1)*H/tp). When tp exceeds
the number of KV heads (GQA), each head is replicated on tp/H consecutive ranks:

    H = 2, tp = 4:   rank 0 1 2 3
                     head 0 0 1 1
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


@dataclass(frozen=True)
class KVCacheLayout:
    num_layers: int
    num_kv_heads: int  # held by this rank
    head_dim: int
    block_size: int
    dtype: str  # a torch dtype name without "torch.", e.g. "float32"
    tp_size: int = 1
    tp_rank: int = 0
    total_kv_heads: int = 0  # the model's; 0: num_kv_heads * tp_size (no head replicated)

    def __post_init__(self) -> None:
        if self.total_kv_heads == 0:
            object.__setattr__(self, "total_kv_heads", self.num_kv_heads * self.tp_size)
        if self.dtype not in _ITEMSIZE:
            raise ValueError(f"KV dtype must be one of {', '.join(_ITEMSIZE)}, got {self.dtype!r}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "tp_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVCacheLayout.{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank must be in [0, {self.tp_size}), got {self.tp_rank}")
        if self.num_kv_heads != _heads_per_rank(self.total_kv_heads, self.tp_size):
            raise ValueError(f"{self.num_kv_heads} KV heads per rank do not split {self.total_kv_heads} over "
                             f"{self.tp_size} ranks")

    @classmethod
    def for_model(cls, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype,
                  tp_size: int = 1, tp_rank: int = 0) -> KVCacheLayout:
        """The layout of rank tp_rank for a model with num_kv_heads KV heads in all (dtype: a torch
        dtype or its name)."""
        name = str(dtype).removeprefix("torch.")
        whole = cls(num_layers, num_kv_heads, head_dim, block_size, name)
        return whole.rank_slice(tp_size, tp_rank)

    # ---- sizes (no tensors) ----
    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """One block of one layer's K (or V): [block_size, num_kv_heads, head_dim]."""
        return (self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_layer_block(self) -> int:
        """K and V of one block in one layer."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def bytes_per_block(self) -> int:
        """K and V of one block in every layer: what a block costs in the pool."""
        return self.num_layers * self.bytes_per_layer_block

    def shape(self, num_blocks: int) -> tuple[int, ...]:
        return (self.num_layers, 2, num_blocks, *self.block_shape)

    def num_blocks_for_bytes(self, num_bytes: int) -> int:
        """How many blocks a memory budget holds (may be 0)."""
        return num_bytes // self.bytes_per_block

    def num_blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- tensor parallelism ----
    def rank_slice(self, tp_size: int, tp_rank: int) -> KVCacheLayout:
        """The layout of one rank of a TP group, from the whole model's layout (tp_size 1)."""
        if self.tp_size != 1:
            raise ValueError("rank_slice() takes the whole model's layout (tp_size 1)")
        if tp_size < 1 or not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank {tp_rank} is not a rank of tp_size {tp_size}")
        heads = self.num_kv_heads
        if tp_size <= heads and heads % tp_size:
            raise ValueError(f"{heads} KV heads cannot be split evenly over {tp_size} ranks: choose a "
                             f"tensor-parallel size that divides {heads} or is a multiple of it")
        if tp_size > heads and tp_size % heads:
            raise ValueError(f"{tp_size} ranks cannot replicate {heads} KV heads evenly: choose a "
                             f"tensor-parallel size that divides {heads} or is a multiple of it")
        return dataclasses.replace(self, num_kv_heads=_heads_per_rank(heads, tp_size), tp_size=tp_size,
                                   tp_rank=tp_rank, total_kv_heads=heads)

    def stage_slice(self, partition, stage: int) -> KVCacheLayout:
        """The layout of a rank of pipeline stage `stage` under `partition` (layers per stage): its
        stage's layers, this layout's heads."""
        first, end = stage_layers(partition, stage)
        return dataclasses.replace(self, num_layers=end - first)

    def largest_stage(self, partition) -> KVCacheLayout:
        """stage_slice of the stage that holds the most layers: the one whose blocks are largest (every
        stage holds as many blocks, of the same ids; pools are sized so that this one fits)."""
        return dataclasses.replace(self, num_layers=max(partition))

    def for_rank(self, tp_rank: int) -> KVCacheLayout:
        """The layout of another rank of the same group."""
        return dataclasses.replace(self, tp_rank=tp_rank)

    def kv_head_range(self) -> tuple[int, int]:
        """The model's KV heads [start, end) this rank holds."""
        if self.tp_size <= self.total_kv_heads:
            start = self.tp_rank * self.num_kv_heads
        else:
            start = self.tp_rank // (self.tp_size // self.total_kv_heads)
        return start, start + self.num_kv_heads

    # ---- tensors ----
    def allocate(self, num_blocks: int, device="cpu"):
        """A zeroed cache tensor of this layout."""
        import torch
        if num_blocks < 1:
            raise ValueError(f"a KV cache needs at least one block, got {num_blocks}")
        return torch.zeros(self.shape(num_blocks), dtype=getattr(torch, self.dtype), device=device)

    def allocate_shared(self, num_blocks: int, device="cpu"):
        """A zeroed cache of this layout that same-host one-sided KV writers can write: in POSIX shared
        memory (host memory), or on a GPU (CUDA IPC), with the control area in shared memory: a
        `kvcache.shared_pool.SharedKVPool`, whose `tensor` is the cache. OSError when /dev/shm cannot
        hold it (the caller falls back to allocate())."""
        from kvcache.shared_pool import SharedKVPool
        return SharedKVPool(self, num_blocks, device=device)

    def check(self, kv_cache) -> None:
        """Raise ValueError unless kv_cache is a contiguous tensor of this layout."""
        got = tuple(kv_cache.shape)
        if len(got) != 6 or got[:2] != (self.num_layers, 2) or got[3:] != self.block_shape:
            raise ValueError(f"kv_cache has shape {got}, the layout wants {self.shape(got[2] if len(got) > 2 else 0)}")
        if str(kv_cache.dtype).removeprefix("torch.") != self.dtype:
            raise ValueError(f"kv_cache has dtype {kv_cache.dtype}, the layout wants {self.dtype}")
        if not kv_cache.is_contiguous():
            raise ValueError("kv_cache must be contiguous")

    @classmethod
    def of(cls, kv_cache, tp_size: int = 1, tp_rank: int = 0, total_kv_heads: int = 0) -> KVCacheLayout:
        """The layout of an existing cache tensor."""
        num_layers, two, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        if two != 2:
            raise ValueError(f"kv_cache must be [num_layers, 2, num_blocks, block_size, Hkv, D], got "
                             f"shape {tuple(kv_cache.shape)}")
        return cls(num_layers, num_kv_heads, head_dim, block_size, str(kv_cache.dtype).removeprefix("torch."),
                   tp_size, tp_rank, total_kv_heads)


def even_partition(num_layers: int, pp_size: int) -> tuple[int, ...]:
    """Layers per pipeline stage, vLLM's default split: num_layers // pp_size each, the remainder one
    more each on the stages just before the last (the last also holds the LM head and samples)."""
    if not 0 < pp_size <= num_layers:
        raise ValueError(f"{pp_size} pipeline stages cannot each hold a share of {num_layers} layers")
    counts = [num_layers // pp_size] * pp_size
    for i in range(2, num_layers % pp_size + 2):
        counts[-i] += 1
    return tuple(counts)


def partition_counts(spec) -> tuple[int, ...] | None:
    """The layer counts --pp-layer-partition names ("5,3", or a YAML list), None for the even split
    (None, "" or "even"); ValueError where a part is not a whole number. Checked against the model by
    `check_partition`."""
    if isinstance(spec, (list, tuple)):
        spec = ",".join(map(str, spec))
    if spec is None or str(spec).strip() in ("", "even"):
        return None
    try:
        return tuple(int(part) for part in str(spec).split(","))
    except ValueError:
        raise ValueError(f"--pp-layer-partition {spec!r}: give the layers of each pipeline stage, comma "
                         "separated (e.g. 7,5), or even") from None


def parse_partition(spec: str | None, num_layers: int, pp_size: int) -> tuple[int, ...]:
    """The stages' layer counts from --pp-layer-partition ("5,3": vLLM's VLLM_PP_LAYER_PARTITION;
    None, "" or "even": `even_partition`); ValueError saying what to change."""
    counts = partition_counts(spec)
    if counts is None:
        return even_partition(num_layers, pp_size)
    check_partition(counts, num_layers, pp_size)
    return counts


def check_partition(counts, num_layers: int, pp_size: int) -> None:
    if len(counts) != pp_size or sum(counts) != num_layers or min(counts) < 1:
        raise ValueError(f"--pp-layer-partition {','.join(map(str, counts))}: give {pp_size} stage sizes "
                         f"(--pipeline-parallel-size), each at least 1, that add up to the model's "
                         f"{num_layers} layers, e.g. {','.join(map(str, even_partition(num_layers, pp_size)))}")


def stage_layers(partition, stage: int) -> tuple[int, int]:
    """The layers [first, end) pipeline stage `stage` holds under `partition` (layers per stage). The
    one rule the model's stages, the KV pools and the KV transfer all use."""
    if not 0 <= stage < len(partition):
        raise ValueError(f"stage {stage} is not a stage of {len(partition)}")
    first = sum(partition[:stage])
    return first, first + partition[stage]


def _heads_per_rank(total_kv_heads: int, tp_size: int) -> int:
    """KV heads each of tp_size ranks holds (one, replicated, where tp_size exceeds them)."""
    return max(1, total_kv_heads // tp_size)
