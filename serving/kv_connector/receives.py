"""Decode side of the transfer worker: blocks the scheduler reserved, lent to the KV receiver.

A RecvKV move hands a request's reserved blocks over here (`expect`). The receiver, on gRPC threads,
asks for them when the prefill instance's Reserve arrives (`reserve`, the BlockAllocator protocol)
and reports the end of the transfer. Each step reports what happened as MoveResults:

    expect ─► started ──reserve──► active ──commit──► finished (the commit may carry the first token)
                 │                   ├──dropped (stall, sender gave up) ──► failed
                 │                   └──cancel (the scheduler gave up) ──► wait until the receiver
                 │                                                         let go ──► failed
                 └──cancel before any Reserve ──► failed

`cancel` runs on the engine thread and returns only once no receiver thread can write the blocks
any more; only then does the scheduler see the move end and free them. What to do about a failed
receive (recompute or fail) is the scheduler's connector policy's call, not this module's.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from kvcache.transfer import KVReceiver, ReceiverServer, TransferConfig, TransferCounters
from kvcache.transfer.layout import KVLayout
from scheduler.kv_moves import ACTIVE, FAILED, FINISHED, STARTED, MoveResult

logger = logging.getLogger(__name__)

_LET_GO_TIMEOUT_S = 10.0
_DROP_RETRY_S = 0.01


@dataclass
class _Expected:
    block_ids: list[int]
    lent: bool = False
    let_go: threading.Event = field(default_factory=threading.Event)  # the receiver holds nothing


class KVReceives:
    def __init__(self, config: TransferConfig, token: str | None = None) -> None:
        self.config = config
        self._token = token  # the deployment's: KVTransfer refuses calls without it
        self.counters = TransferCounters()
        self._lock = threading.Lock()
        self._expected: dict[str, _Expected] = {}
        self._cancelled: dict[str, _Expected] = {}  # cancelled while lent, until the receiver lets go
        self._results: list[MoveResult] = []
        self._block_size = 1
        self._server: ReceiverServer | None = None
        self.address = ""  # of the KVTransfer service, once started

    def start_server(self, kv_cache: torch.Tensor, layout: KVLayout, host: str) -> str:
        """Serve KVTransfer on host (a free port); returns its address."""
        self._block_size = layout.block_size
        receiver = KVReceiver(kv_cache, layout, self, self.config, self.counters)
        self._server = ReceiverServer(receiver, host, token=self._token).start()
        self.address = self._server.address
        return self.address

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()

    # ---- engine thread ----
    def expect(self, request_id: str, block_ids: list[int]) -> None:
        with self._lock:
            self._expected[request_id] = _Expected(list(block_ids))
            self._results.append(MoveResult(request_id, "recv", STARTED))

    def has(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._expected

    def cancel(self, request_id: str, reason: str) -> None:
        """Forget the request; returns once the receiver writes none of its blocks, and reports the
        receive failed (unless it ended first)."""
        with self._lock:
            expected = self._expected.pop(request_id, None)
            if expected is not None and expected.lent:
                self._cancelled[request_id] = expected
        if expected is None:
            return
        if expected.lent and not expected.let_go.is_set():
            self._wait_let_go(request_id, expected)
        with self._lock:
            self._cancelled.pop(request_id, None)
            self._results.append(MoveResult(request_id, "recv", FAILED, reason))

    def _wait_let_go(self, request_id: str, expected: _Expected) -> None:
        deadline = threading.Event()
        timer = threading.Timer(_LET_GO_TIMEOUT_S, deadline.set)
        timer.start()
        try:
            # drop() finds nothing while the receiver is still between reserve() and recording the
            # reservation, so ask again until it lets go
            while not deadline.is_set():
                self._server.receiver.drop(request_id, "the request was cancelled on the decode instance",
                                           routine=True)
                if expected.let_go.wait(_DROP_RETRY_S):
                    return
            logger.error("KV receiver still holds blocks of cancelled request %s after %.0fs", request_id,
                         _LET_GO_TIMEOUT_S)
        finally:
            timer.cancel()

    def poll(self) -> list[MoveResult]:
        with self._lock:
            results, self._results = self._results, []
        return results

    # ---- BlockAllocator (receiver threads) ----
    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
        num_blocks = -(-num_tokens // self._block_size)
        with self._lock:
            expected = self._expected.get(request_id)
            if expected is None or expected.lent or num_blocks > len(expected.block_ids):
                return None  # unknown, cancelled or already lent: nothing to write into
            expected.lent = True
            self._results.append(MoveResult(request_id, "recv", ACTIVE))
            return expected.block_ids[:num_blocks]

    def release(self, request_id: str) -> None:
        self._let_go(request_id)  # the blocks stay the scheduler's: it frees them itself

    def on_transfer_complete(self, request_id: str, first_token_id: int | None = None) -> None:
        with self._lock:
            self._let_go_locked(request_id)
            if self._expected.pop(request_id, None) is not None:
                self._results.append(MoveResult(request_id, "recv", FINISHED, first_token_id=first_token_id))

    def on_transfer_failed(self, request_id: str, reason: str) -> None:
        with self._lock:
            self._let_go_locked(request_id)
            if self._expected.pop(request_id, None) is not None:
                self._results.append(MoveResult(request_id, "recv", FAILED, reason))

    def _let_go(self, request_id: str) -> None:
        with self._lock:
            self._let_go_locked(request_id)

    def _let_go_locked(self, request_id: str) -> None:
        expected = self._expected.get(request_id) or self._cancelled.get(request_id)
        if expected is not None:
            expected.let_go.set()

    def counter_values(self) -> dict[str, float]:
        return self.counters.snapshot()
