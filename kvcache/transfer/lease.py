"""The prefill side's hold on a request's KV blocks while they travel to the decode side.

A lease is granted when a transfer begins and ends exactly once: on acknowledgement, on failure, or
when it expires. Ending it calls `release_blocks(request_id)` (after any copy still reading the
blocks has finished), which is where the engine frees them.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from kvcache.transfer.pins import Pins


@dataclass
class Lease:
    request_id: str
    block_ids: list[int]
    deadline: float  # clock() value after which the lease expires
    pins: Pins


class LeaseTable:
    """Thread-safe. release_blocks runs on the thread that ends the lease (or drops its last pin)."""

    def __init__(self, release_blocks: Callable[[str], None], ttl_s: float | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """ttl_s None: leases never expire here (the owner of the blocks keeps the deadline)."""
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl_s}")
        self._release_blocks = release_blocks
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}

    def __contains__(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._leases

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)

    def grant(self, request_id: str, block_ids: list[int]) -> None:
        """Hold block_ids for request_id until release/expiry. ValueError if already held."""
        with self._lock:
            if request_id in self._leases:
                raise ValueError(f"request {request_id!r} already holds a KV lease; one transfer per request")
            deadline = float("inf") if self._ttl_s is None else self._clock() + self._ttl_s
            self._leases[request_id] = Lease(request_id, list(block_ids), deadline,
                                             Pins(lambda: self._release_blocks(request_id)))

    def pin(self, request_id: str) -> Lease | None:
        """The lease with one more pin (its blocks stay valid until lease.pins.unpin()), or None when
        the lease has ended."""
        with self._lock:
            lease = self._leases.get(request_id)
        return lease if lease is not None and lease.pins.pin() else None

    def release(self, request_id: str) -> bool:
        """End the lease (ack or failure). False when it had already ended."""
        with self._lock:
            lease = self._leases.pop(request_id, None)
        return lease is not None and lease.pins.close()

    def expire(self) -> list[str]:
        """End every lease past its deadline; returns their request ids."""
        now = self._clock()
        with self._lock:
            expired = [lease for lease in self._leases.values() if lease.deadline <= now]
            for lease in expired:
                del self._leases[lease.request_id]
        for lease in expired:
            lease.pins.close()
        return [lease.request_id for lease in expired]

    def release_all(self) -> None:
        """Shutdown: end every lease."""
        with self._lock:
            leases = list(self._leases.values())
            self._leases.clear()
        for lease in leases:
            lease.pins.close()
