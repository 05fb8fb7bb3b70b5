"""Decode side of the connector: the blocks the engine reserved, lent to the KV receiver.

The engine reserves a remote-prefill request's blocks when it is added (the scheduler, on the engine
thread) and hands them over here (`expect`). The receiver, on gRPC threads, asks for them when the
prefill instance's Reserve arrives (`reserve`, the BlockAllocator protocol) and reports the end of the
transfer. A request moves through:

    expected ──reserve──► lent ──complete──► finished_recving (the engine decodes)
       │                   ├──dropped (stall, sender gave up)──► failed_recving (recompute) or
       │                   │                                      failed by policy
       │                   └──cancel (engine aborts it)──► wait until the receiver let go, then
       │                                                   the engine frees the blocks
       └── first token in, no Reserve within stall_timeout_s ──► failed (nothing was sent)

`cancel` runs on the engine thread *before* the engine frees the blocks and returns only once no
receiver thread can write them any more: a late chunk never lands in a block another request owns.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from kvcache.transfer import KVReceiver, ReceiverServer, TransferConfig, TransferCounters
from kvcache.transfer.layout import KVLayout
from serving.runner.connector import TransferEvents

logger = logging.getLogger(__name__)

_LET_GO_TIMEOUT_S = 10.0
_DROP_RETRY_S = 0.01


@dataclass
class _Expected:
    block_ids: list[int]
    lent: bool = False
    first_token_at: float | None = None
    let_go: threading.Event = field(default_factory=threading.Event)  # the receiver holds nothing


class KVReceives:
    def __init__(self, config: TransferConfig, clock: Callable[[], float] = time.monotonic,
                 token: str | None = None) -> None:
        self.config = config
        self._token = token  # the deployment's: KVTransfer refuses calls without it
        self.counters = TransferCounters()
        self._clock = clock
        self._lock = threading.Lock()
        self._expected: dict[str, _Expected] = {}
        self._cancelled: dict[str, _Expected] = {}  # aborted while lent; until the receiver lets go
        self._events = TransferEvents()
        self._failed_by_policy: list[str] = []
        self.num_recompute_fallbacks = 0
        self.num_failed_by_policy = 0
        self.num_never_sent = 0
        self._block_size = 1
        self._server: ReceiverServer | None = None
        self.address = ""  # of the KVTransfer service, once started

    def start(self, kv_cache: torch.Tensor, layout: KVLayout, host: str) -> str:
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
            self._expected[request_id] = _Expected(block_ids)

    def first_token_arrived(self, request_id: str) -> None:
        """The prefill is done: from now on its KV has stall_timeout_s to start arriving."""
        with self._lock:
            expected = self._expected.get(request_id)
            if expected is not None and expected.first_token_at is None:
                expected.first_token_at = self._clock()

    def cancel(self, request_ids: list[str]) -> None:
        """Forget these requests; returns once the receiver writes none of their blocks."""
        waiting = []
        with self._lock:
            for request_id in request_ids:
                expected = self._expected.pop(request_id, None)
                if expected is not None and expected.lent and not expected.let_go.is_set():
                    self._cancelled[request_id] = expected
                    waiting.append((request_id, expected))
        for request_id, expected in waiting:
            self._wait_let_go(request_id, expected)

    def _wait_let_go(self, request_id: str, expected: _Expected) -> None:
        deadline = self._clock() + _LET_GO_TIMEOUT_S
        # drop() finds nothing while the receiver is still between reserve() and recording the
        # reservation, so ask again until it lets go
        while True:
            self._server.receiver.drop(request_id, "the request was aborted on the decode instance")
            if expected.let_go.wait(_DROP_RETRY_S):
                break
            if self._clock() > deadline:
                logger.error("KV receiver still holds blocks of aborted request %s after %.0fs",
                             request_id, _LET_GO_TIMEOUT_S)
                break
        with self._lock:
            self._cancelled.pop(request_id, None)

    def poll(self) -> TransferEvents:
        now = self._clock()
        with self._lock:
            never_sent = [rid for rid, e in self._expected.items()
                          if not e.lent and e.first_token_at is not None
                          and now - e.first_token_at > self.config.stall_timeout_s]
            for request_id in never_sent:
                del self._expected[request_id]
                self.num_never_sent += 1
                self._fail(request_id, "no KV arrived after the first token")
            events, self._events = self._events, TransferEvents()
        return events

    def take_failed(self) -> list[str]:
        """Requests whose KV will not come while the policy is "fail": the engine fails them."""
        with self._lock:
            failed, self._failed_by_policy = self._failed_by_policy, []
        return failed

    def _fail(self, request_id: str, reason: str) -> None:
        """Caller holds the lock."""
        logger.warning("KV of request %s will not arrive (%s): %s", request_id, reason,
                       "recomputing the prompt" if self.config.failure_policy == "recompute" else "failing it")
        if self.config.failure_policy == "recompute":
            self.num_recompute_fallbacks += 1
            self._events.failed_recving.append(request_id)
        else:
            self.num_failed_by_policy += 1
            self._failed_by_policy.append(request_id)

    # ---- BlockAllocator (receiver threads) ----
    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
        num_blocks = -(-num_tokens // self._block_size)
        with self._lock:
            expected = self._expected.get(request_id)
            if expected is None or expected.lent or num_blocks > len(expected.block_ids):
                return None  # unknown, aborted or already lent: nothing to write into
            expected.lent = True
            return expected.block_ids[:num_blocks]

    def release(self, request_id: str) -> None:
        self._let_go(request_id)  # the blocks stay the engine's: it frees them itself

    def on_transfer_complete(self, request_id: str) -> None:
        with self._lock:
            self._let_go_locked(request_id)
            if self._expected.pop(request_id, None) is not None:
                self._events.finished_recving.append(request_id)

    def on_transfer_failed(self, request_id: str, reason: str) -> None:
        with self._lock:
            self._let_go_locked(request_id)
            if self._expected.pop(request_id, None) is not None:
                self._fail(request_id, reason)

    def _let_go(self, request_id: str) -> None:
        with self._lock:
            self._let_go_locked(request_id)

    def _let_go_locked(self, request_id: str) -> None:
        expected = self._expected.get(request_id) or self._cancelled.get(request_id)
        if expected is not None:
            expected.let_go.set()

    def counter_values(self) -> dict[str, float]:
        values = self.counters.snapshot()
        values.update(num_recompute_fallbacks=self.num_recompute_fallbacks,
                      num_failed_by_policy=self.num_failed_by_policy, num_never_sent=self.num_never_sent)
        return values
