"""Cumulative transfer counters, read by the engine and exported as Prometheus metrics."""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field


@dataclass
class TransferCounters:
    """Monotonic totals since construction; one object per sender or receiver.

    seconds_* are per-transfer wall times summed over transfers (first chunk handed to the wire ->
    acknowledgement), so num_bytes_* / seconds_* is the mean per-transfer throughput.
    """
    num_bytes_sent: int = 0
    num_bytes_received: int = 0
    seconds_sending: float = 0.0
    seconds_receiving: float = 0.0
    num_transfers_sent: int = 0       # acknowledged by the peer
    num_transfers_received: int = 0   # all layers written and acknowledged
    num_failed: int = 0               # gave up after retries (sender) or dropped (receiver)
    num_retries: int = 0
    num_refused: int = 0              # reservations refused for lack of blocks (backpressure)
    num_leases_expired: int = 0
    num_stalled: int = 0              # partial transfers the receiver dropped after a stall
    num_checksum_mismatches: int = 0  # chunks refused because their payload did not match its CRC-32
    num_unauthenticated_calls: int = 0  # calls refused for a missing or wrong deployment token
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: float) -> None:
        """Add each delta to the counter of that name (thread-safe)."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict[str, float]:
        """A consistent copy of every counter, by name."""
        with self._lock:
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "_lock"}
