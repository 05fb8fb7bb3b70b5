"""Where a chunk's payload travels: inside the gRPC message, or in a shared-memory slab.

The sender picks one at connect() and never branches on it afterwards.
"""
from __future__ import annotations

from typing import Callable

import torch

from kvcache.transfer import wire
from kvcache.transfer._proto import kv_transfer_pb2 as pb
from kvcache.transfer.shm import SlabPool

Fill = Callable[[torch.Tensor], None]  # writes header.num_bytes bytes into the given uint8 tensor


def _nothing() -> None:
    pass


class InlinePayloads:
    """The payload is the tail of the PushChunk message itself (see wire.py)."""
    uses_shm = False

    def encode(self, header: pb.ChunkHeader, fill: Fill, timeout_s: float) -> tuple[bytes, Callable[[], None]]:
        """(message, done): call done() once the message was sent (or failed)."""
        message, payload = wire.new_chunk_message(header)
        fill(payload)
        if header.HasField("crc32"):  # known only now: a fixed-size field, rewritten in place
            wire.rewrite_header(message, header)
        return message, _nothing

    def close(self) -> None:
        pass


class ShmPayloads:
    """The payload goes into a free slab; the message carries (segment, offset) only."""
    uses_shm = True

    def __init__(self, slabs: SlabPool) -> None:
        self._slabs = slabs

    def encode(self, header: pb.ChunkHeader, fill: Fill, timeout_s: float) -> tuple[bytes, Callable[[], None]]:
        slab = self._slabs.acquire(timeout_s)
        if slab is None:
            raise TimeoutError(f"no free shared-memory slab within {timeout_s:g} s")
        try:
            header.shm.segment_name = slab.segment.name
            header.shm.offset = 0
            fill(slab.view(header.num_bytes))
        except BaseException:
            self._slabs.release(slab)
            raise
        # The slab is reusable once the receiver has acknowledged (it copies out before replying).
        return wire.encode_control_chunk(header), lambda: self._slabs.release(slab)

    def close(self) -> None:
        self._slabs.close()
