"""The worker half of KV connectors: what carries out the KV moves a plan holds.

The model runner hands a step's moves to its connector worker before the forward pass, tells it each
layer range as the pass finishes it (so a send ships layers while later ones compute) and the tokens
it sampled (a send's commit carries the first one), and polls it for moves that started or ended:

    start(moves) ─ wait_layers(0, 1) ... layers_done(rows, 0, 4) ─ ... ─ tokens_sampled ─ wait_layers(0, L) ─ poll()

`wait_layers(start, end)` comes before the forward pass touches those layers: a worker whose copies
read or write the cache the pass uses (the swap worker) returns once they are done there.

`start` never raises: a move the worker cannot take is reported failed by the next poll, and every
move it took is reported ended by some later poll, so the scheduler never waits for ever and never
frees a block under a running copy. Colocated instances use `NullWorker`; instances that send or
receive KV use `TransferWorker` (transfer.py); with `--preemption-mode swap` a `SwapWorker` (swap.py)
sits beside either in a `ComposedWorker`; a shared-pool (semi-PD) worker plugs in the same way.
"""
from __future__ import annotations

from typing import Protocol

from scheduler.kv_moves import FAILED, KVMove, MoveResult


class KVConnectorWorker(Protocol):
    address: str  # where peers send KV to this worker ("" when it receives none)

    def start(self, moves: list[KVMove]) -> None:
        """Take this step's moves (at the start of the step, on the engine thread). Never raises."""

    def wait_layers(self, layer_start: int, layer_end: int) -> None:
        """Return once this worker's copies that touch layers [start, end) of the cache are done (the
        forward pass is about to read or write them). Raises when they cannot finish."""

    def layers_done(self, request_ids: list[str], layer_start: int, layer_end: int) -> None:
        """These requests' KV of layers [start, end) for this step's tokens is in the cache."""

    def tokens_sampled(self, token_ids: dict[str, int]) -> None:
        """The tokens sampled this step, per request."""

    def poll(self) -> list[MoveResult]:
        """Moves that started or ended since the last poll (never blocks)."""

    def counters(self) -> dict[str, float]: ...

    def histograms(self) -> dict[str, dict]:
        """Histograms by metric name, each as LatencyHistogram.snapshot() (kvcache/transfer/counters.py)."""

    def close(self) -> None: ...


class NullWorker:
    """Moves nothing: any move it is given fails (a colocated instance is never asked for one)."""
    address = ""

    def __init__(self) -> None:
        self._results: list[MoveResult] = []

    def start(self, moves: list[KVMove]) -> None:
        self._results += [MoveResult(m.request_id, m.kind, FAILED, "this instance moves no KV")
                          for m in moves if m.kind != "cancel"]

    def wait_layers(self, layer_start: int, layer_end: int) -> None:
        pass

    def layers_done(self, request_ids: list[str], layer_start: int, layer_end: int) -> None:
        pass

    def tokens_sampled(self, token_ids: dict[str, int]) -> None:
        pass

    def poll(self) -> list[MoveResult]:
        results, self._results = self._results, []
        return results

    def counters(self) -> dict[str, float]:
        return {}

    def histograms(self) -> dict[str, dict]:
        return {}

    def close(self) -> None:
        pass
