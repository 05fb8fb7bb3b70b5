"""Time, injected: scheduling code asks its clock, never `time.monotonic()` directly.

The runtime uses `MonotonicClock` (real seconds); the simulator uses `VirtualClock`, which only moves
when the engine loop advances it by each step's modelled duration. `advance` is a no-op on the real
clock: real time passes by itself.
"""
from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on this clock's own scale (only differences mean anything)."""

    def advance(self, seconds: float) -> None:
        """A step took `seconds`: move virtual time forward (real clocks ignore this)."""


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    def advance(self, seconds: float) -> None:
        pass


class VirtualClock:
    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"time cannot go backwards (advance by {seconds})")
        self._now += seconds

    def advance_to(self, when: float) -> None:
        """Jump to `when` (the next event of a simulation) if it lies ahead."""
        self._now = max(self._now, when)
