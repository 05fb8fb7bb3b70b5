"""Deferred release of a resource that background copies may still be reading or writing.

Both sides copy KV blocks on worker threads while other threads may decide to give the blocks up
(an acknowledgement, a lease expiry, a stalled transfer). Handing blocks back while a copy runs
would let the engine reuse them under the copy, so release waits for the last copy:

    pin() ─ copy ─ unpin()          pin() ─ copy ─ unpin() ──► release()   (deferred to here)
                         close() ──────────────┘
"""
from __future__ import annotations

import threading
from typing import Callable


class Pins:
    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release
        self._lock = threading.Lock()
        self._num_pins = 0
        self._closing = False
        self._released = False

    @property
    def is_closing(self) -> bool:
        return self._closing

    def pin(self) -> bool:
        """Take a pin; False (no pin taken) once close() was called: the blocks may be gone."""
        with self._lock:
            if self._closing:
                return False
            self._num_pins += 1
            return True

    def unpin(self) -> None:
        with self._lock:
            if self._num_pins <= 0:
                raise RuntimeError("unpin() without a matching pin()")
            self._num_pins -= 1
            run_release = self._closing and self._num_pins == 0 and not self._released
            self._released |= run_release
        if run_release:
            self._release()

    def close(self) -> bool:
        """Refuse new pins and release once none is held. Runs release at most once, outside the
        lock, on whichever thread drops the last pin. Returns False when already closing."""
        with self._lock:
            if self._closing:
                return False
            self._closing = True
            run_release = self._num_pins == 0
            self._released |= run_release
        if run_release:
            self._release()
        return True
