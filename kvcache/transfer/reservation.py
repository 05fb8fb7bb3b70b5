"""What the decode side's receiver works with: the engine's allocator protocol, a refusal to send back
as a gRPC status, and one request's reservation (kvcache/transfer/receiver.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import grpc
import torch

from kvcache.transfer.pins import Pins


class NotRegisteredYet(Exception):
    """BlockAllocator.reserve: the engine has not registered this request yet, and has not ended it
    either (the router starts the prefill while the decode instance reserves, so a sender may come
    first). The sender is told NOT_FOUND and asks again."""


class BlockAllocator(Protocol):
    """The engine's side of the receiver. Called from gRPC worker threads: must be thread-safe."""

    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Allocate ceil(num_tokens / block_size) blocks for the request; None when there is no room
        (the sender is told RESOURCE_EXHAUSTED); raises NotRegisteredYet when the request may still
        come (the sender is told NOT_FOUND). Must not block."""

    def release(self, request_id: str) -> None:
        """Free the reserved blocks of a transfer that will not complete."""

    def on_transfer_complete(self, request_id: str, first_token_id: int | None) -> None:
        """Every layer of every reserved block is written: the request can join decoding. The commit
        may carry the first output token the prefill sampled (None when it does not)."""

    def on_transfer_failed(self, request_id: str, reason: str) -> None:
        """The transfer was dropped (stall, abort); release() has already been called."""


class RpcError(Exception):
    """A refusal to send back as a gRPC status (with optional trailing metadata)."""

    def __init__(self, code: grpc.StatusCode, details: str,
                 trailing_metadata: tuple[tuple[str, bytes], ...] = ()) -> None:
        super().__init__(details)
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


@dataclass
class Reservation:
    request_id: str
    block_ids: torch.Tensor     # [num_blocks] int64, destination ids in this kv_cache
    attempt: int
    written: torch.Tensor       # [ranks, num_layers, num_blocks] bool: which (rank, layer, block) arrived
    started: float
    last_progress: float
    num_bytes: int = 0
    outcome: str = ""           # "" while open; "complete", or why it was dropped
    first_token_id: int | None = None  # carried by the commit
    routine: bool = False       # dropped on request (the sender gave up, the engine cancelled): log quietly
    # One-sided only: the writer's sender id, its control slot and ticket, whether the writer's pin
    # is still held, whether the blocks were counted as quarantined, the last progress value seen.
    writer: str = ""
    slot: int = -1
    ticket: int = 0
    writer_pinned: bool = False
    quarantined: bool = False
    progress_seen: int = 0
    pins: Pins = field(init=False)
