"""Cumulative transfer counters and the transfer-latency histogram, read by the engine and exported as
Prometheus metrics."""
from __future__ import annotations

import bisect
import dataclasses
import threading
from dataclasses import dataclass, field

# Upper bounds (seconds) of the transfer-latency buckets: a few ms for a small prompt over shared
# memory up to the default lease (60 s); +Inf is implied.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
                     40.0, 80.0)


class LatencyHistogram:
    """Thread-safe cumulative histogram (Prometheus semantics: counts per upper bound, plus sum and
    count). snapshot() is a plain dict that crosses process boundaries as is."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"histogram bounds must increase strictly, got {bounds}")
        self.bounds = tuple(bounds)
        self._lock = threading.Lock()
        self._counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.bounds, value)] += 1
            self._sum += value

    def snapshot(self) -> dict:
        """{"bounds": [...], "counts": [cumulative per bound, then +Inf], "sum": s, "count": n}"""
        with self._lock:
            cumulative, total = [], 0
            for count in self._counts:
                total += count
                cumulative.append(total)
            return {"bounds": list(self.bounds), "counts": cumulative, "sum": self._sum, "count": total}


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
    num_one_sided_sent: int = 0       # of num_transfers_sent: written straight into the peer's pool
    num_one_sided_received: int = 0   # of num_transfers_received: written by the peer itself
    # One-sided: blocks of dropped reservations kept from the pool until their writer confirmed it
    # stopped or exited (in quarantine now: the difference of the two).
    num_blocks_quarantined: int = 0
    num_blocks_released_from_quarantine: int = 0
    # begin() -> acknowledgement (sender), Reserve -> Commit (receiver), per successful transfer
    latency: LatencyHistogram = field(default_factory=LatencyHistogram, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: float) -> None:
        """Add each delta to the counter of that name (thread-safe)."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict[str, float]:
        """A consistent copy of every counter, by name."""
        with self._lock:
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name not in ("_lock", "latency")}
