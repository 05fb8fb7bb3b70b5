"""A decode instance's KV pool in POSIX shared memory, so that a prefill instance on the same host can
write the blocks it was granted directly (one-sided writes; see docs/kv_transfer.md).

One file per instance, each region page-aligned so that a peer can map each with its own protection:

    offset 0                kv_cache [num_layers, 2, num_blocks, block_size, Hkv, D]   peer: read-write
                            (on a GPU the cache is device memory, not in the file: a peer opens it
                            with the CUDA IPC handle the receiver sends, kvcache/cuda_ipc.py)
    tickets_offset          int64[num_slots]  ticket of the reservation open in each slot, 0 = closed
                                              written by the owner (the receiver)      peer: read-only
    progress_offset         int64[num_slots]  chunks written into the slot's reservation so far
                                              written by the peer (the writer)         peer: read-write

Slots are the transfer layer's business (kvcache/transfer/writers.py); the pool only holds them. One
slot per block is always enough: every open or draining reservation holds at least one block.

Each control word is read and written as one aligned 8-byte access (a memoryview of format 'q':
CPython copies the item with an 8-byte memcpy, which compiles to a single load or store), so a
reader never sees half of an old value and half of a new one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache.layout import KVCacheLayout
from kvcache.shared_memory import SharedFile, map_own, page_align

POOL_PREFIX = "pdkv"


@dataclass(frozen=True)
class PoolRegions:
    """Where each part of a pool file lies (what a peer needs besides the file's name)."""
    kv_bytes: int
    tickets_offset: int
    progress_offset: int
    num_slots: int
    file_bytes: int

    @classmethod
    def for_pool(cls, kv_bytes: int, num_slots: int) -> PoolRegions:
        control_bytes = page_align(8 * num_slots)
        tickets_offset = page_align(kv_bytes)
        progress_offset = tickets_offset + control_bytes
        return cls(kv_bytes, tickets_offset, progress_offset, num_slots, progress_offset + control_bytes)

    @property
    def control_bytes(self) -> int:
        """Length of the tickets region (and of the progress region), page-aligned."""
        return self.progress_offset - self.tickets_offset


class SharedKVPool:
    """Owns the file: close() removes its name (the memory stays mapped for this process and its
    peers until they unmap it). `tensor` is the kv_cache the model runner uses."""

    def __init__(self, layout: KVCacheLayout, num_blocks: int, num_slots: int | None = None,
                 device: torch.device | str = "cpu") -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV cache needs at least one block, got {num_blocks}")
        self.layout = layout
        self.num_blocks = num_blocks
        self.kv_bytes = num_blocks * layout.bytes_per_block
        on_gpu = torch.device(device).type == "cuda"
        # on a GPU the file holds only the control regions
        self.regions = PoolRegions.for_pool(0 if on_gpu else self.kv_bytes, num_slots or num_blocks)
        self.file = SharedFile(POOL_PREFIX, self.regions.file_bytes)  # zero-filled, every page reserved
        self._mapping = map_own(self.file)
        dtype = getattr(torch, layout.dtype)
        if on_gpu:
            self.tensor = torch.zeros(layout.shape(num_blocks), dtype=dtype, device=device)
        else:
            self.tensor = torch.frombuffer(self._mapping, dtype=dtype, count=self.kv_bytes // layout.itemsize
                                           ).view(layout.shape(num_blocks))   # [L, 2, num_blocks, bs, Hkv, D]
        whole = memoryview(self._mapping)
        slots = self.regions.num_slots
        self.tickets = whole[self.regions.tickets_offset:self.regions.tickets_offset + 8 * slots].cast("q")
        self.progress = whole[self.regions.progress_offset:self.regions.progress_offset + 8 * slots].cast("q")

    @property
    def name(self) -> str:
        return self.file.name

    @property
    def num_slots(self) -> int:
        return self.regions.num_slots

    def close(self) -> None:
        """Remove the name; the tensor stays valid (this process keeps its mapping)."""
        self.file.close()
