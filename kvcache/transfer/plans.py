"""KV transfer between different tensor-parallel plans: which sending rank's heads fill each receiving
rank's cache, and the packing that builds a receiving rank's payload from the sending ranks' caches.

Each side's ranks hold the model's KV heads by kvcache/layout.py's one rule (H/tp contiguous heads
per rank, or one head replicated on tp/H ranks). A receiving rank gets exactly its own heads, each
taken from the first sending rank that holds it:

    prefill TP=2, H=4                decode TP=1                fan-in
    rank 0: heads 0 1   ──────┐
    rank 1: heads 2 3   ──────┴──►   rank 0: heads 0 1 2 3

    prefill TP=1, H=2                decode TP=4                fan-out (H < tp: replicated)
    rank 0: heads 0 1   ──┬──────►   rank 0: head 0    rank 1: head 0
                          └──────►   rank 2: head 1    rank 3: head 1

Chunks are per receiving rank ([L', 2, n, block_size, Hkv of that rank, D]), so what a receiving
rank is sent is exactly what it owns, and it is written with the same unpack as a same-plan chunk.
Layers are whole on every rank (pipeline stages are not built yet).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pdkernels.ops import pack_kv
from kvcache.transfer.layout import KVLayout


@dataclass(frozen=True)
class HeadCopy:
    """num_heads heads of sending rank src_rank's cache, from its head src_head, fill the receiving
    rank's heads from dst_head (indices within each rank's own cache)."""
    src_rank: int
    src_head: int
    dst_head: int
    num_heads: int


def head_routes(src: KVLayout, dst: KVLayout) -> list[tuple[HeadCopy, ...]]:
    """Per receiving rank of dst, the copies from src's ranks that fill all of its heads.
    ValueError when the two do not hold the same model heads."""
    if src.total_kv_heads != dst.total_kv_heads:
        raise ValueError(f"the sender holds {src.total_kv_heads} KV heads in all, the receiver {dst.total_kv_heads}")
    src_ranges = [src.rank_cache_layout(r).kv_head_range() for r in range(src.tp_size)]  # stage 0's TP ranks
    routes = []
    for rank in range(dst.tp_size):
        first, last = dst.rank_cache_layout(rank).kv_head_range()
        copies: list[HeadCopy] = []
        for head in range(first, last):
            owner = next(r for r, (start, end) in enumerate(src_ranges) if start <= head < end)
            previous = copies[-1] if copies else None
            if previous is not None and previous.src_rank == owner \
                    and previous.src_head + previous.num_heads == head - src_ranges[owner][0]:
                copies[-1] = HeadCopy(owner, previous.src_head, previous.dst_head, previous.num_heads + 1)
            else:
                copies.append(HeadCopy(owner, head - src_ranges[owner][0], head - first, 1))
        routes.append(tuple(copies))
    return routes


def is_whole_rank(copies: tuple[HeadCopy, ...], src: KVLayout) -> bool:
    """The receiving rank's heads are all of one sending rank's, in order (a same-plan copy)."""
    return len(copies) == 1 and copies[0].src_head == 0 and copies[0].num_heads == src.num_kv_heads


def pack_rank(kv_caches: list[torch.Tensor], copies: tuple[HeadCopy, ...], src: KVLayout, block_ids: torch.Tensor,
              layer_start: int, layer_end: int, out: torch.Tensor) -> None:
    """Fill out [L', 2, n, block_size, Hkv of the receiving rank, D] with blocks block_ids [n] of layers
    [layer_start, layer_end), head by head from the sending ranks' caches kv_caches[r]
    [L, 2, num_blocks, block_size, Hkv, D]."""
    if is_whole_rank(copies, src):
        pack_kv(kv_caches[copies[0].src_rank], block_ids, layer_start, layer_end, out=out)
        return
    ids = block_ids.long()
    for copy in copies:  # one pass each: gathered from a strided view straight into (a slice of) out
        heads = kv_caches[copy.src_rank][layer_start:layer_end, :, :, :,
                                         copy.src_head:copy.src_head + copy.num_heads]   # [L', 2, B, bs, h, D]
        torch.index_select(heads, 2, ids, out=out[:, :, :, :, copy.dst_head:copy.dst_head + copy.num_heads])
