"""A daemon thread that runs one sweep function every interval until stopped."""
from __future__ import annotations

import logging
import threading
from typing import Callable

logger = logging.getLogger(__name__)


class Reaper:
    def __init__(self, sweep: Callable[[], object], interval_s: float, name: str = "kv-transfer-reaper") -> None:
        if interval_s <= 0:
            raise ValueError(f"reaper interval must be positive, got {interval_s}")
        self._sweep = sweep
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._sweep()
            except Exception:  # a failing sweep must not end the sweeping
                logger.exception("KV transfer sweep failed")
