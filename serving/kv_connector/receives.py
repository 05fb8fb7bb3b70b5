"""Decode side of the transfer worker: blocks the scheduler reserved, lent to the KV receiver.

A RecvKV move hands a request's reserved blocks over here (`expect`). The receiver, on gRPC threads,
asks for them when the prefill instance's Reserve arrives (`reserve`, the BlockAllocator protocol)
and reports the end of the transfer. Each step reports what happened as MoveResults:

    expect ─► started ──reserve──► active ──commit──► finished (the commit may carry the first token)
                 │                   ├──dropped (stall, sender gave up) ──► failed
                 │                   └──cancel (the scheduler gave up) ──► the receiver drops it;
                 │                                                         failed once it let go
                 └──cancel before any Reserve ──► failed

A prefill instance may ask before the engine has registered the request (the router starts the prefill
while this instance reserves): `reserve` then raises NotRegisteredYet and the sender asks again, unless
the request has already ended here (cancelled or received; the last _ENDED_MEMORY ids are
remembered), which is refused at once.

`cancel` runs on the engine thread and does not wait: the receive is reported failed (and only then
does the scheduler free the blocks, which it holds meanwhile) once no copy can write them any more.
On the one-sided path that is when the prefill process confirmed its writes stopped or exited, which
a stopped (SIGSTOP) or hung writer may delay for as long as it lasts: its blocks stay quarantined
(counted by the receiver) and the engine thread goes on. What to do about a failed receive
(recompute or fail) is the scheduler's connector policy's call, not this module's.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from kvcache.shared_pool import SharedKVPool
from kvcache.transfer import KVReceiver, ReceiverServer, TransferConfig, TransferCounters
from kvcache.transfer.layout import KVLayout
from kvcache.transfer.reservation import NotRegisteredYet
from scheduler.kv_moves import ACTIVE, FAILED, FINISHED, STARTED, MoveResult

logger = logging.getLogger(__name__)

_RECORD_WAIT_S = 1.0
_DROP_RETRY_S = 0.001
_ENDED_MEMORY = 65536  # request ids (unique per router leg) that ended here, refused at once if asked for


@dataclass
class _Expected:
    block_ids: list[int]
    lent: bool = False
    let_go: threading.Event = field(default_factory=threading.Event)  # the receiver holds nothing
    cancelled: str = ""  # why the engine cancelled it while lent (reported when the receiver lets go)
    dropped: bool = False  # the receiver has dropped its reservation


class KVReceives:
    def __init__(self, config: TransferConfig, token: str | None = None) -> None:
        self.config = config
        self._token = token  # the deployment's: KVTransfer refuses calls without it
        self.counters = TransferCounters()
        self._lock = threading.Lock()
        self._expected: dict[str, _Expected] = {}
        self._cancelled: dict[str, _Expected] = {}  # cancelled while lent, until the receiver lets go
        self._results: list[MoveResult] = []
        self._ended: OrderedDict[str, None] = OrderedDict()  # the latest ids expected here and ended since
        self._block_size = 1
        self._server: ReceiverServer | None = None
        self.address = ""  # of the KVTransfer service, once started

    def start_server(self, kv_caches: list[torch.Tensor], layout: KVLayout, host: str,
                     pool: SharedKVPool | None = None) -> str:
        """Serve KVTransfer on host (a free port) into every rank's cache (rank r's at index r); returns
        its address. pool: the shared-memory pool rank 0's cache lives in, with one rank only (same-host
        senders then write into it themselves); the receiver owns it."""
        self._block_size = layout.block_size
        receiver = KVReceiver(kv_caches, layout, self, self.config, self.counters, pool=pool)
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
        """Forget the request and drop its transfer; the receive is reported failed once the receiver
        writes none of its blocks (at once if it never lent them). Does not wait for that."""
        with self._lock:
            expected = self._expected.pop(request_id, None)
            if expected is None:
                return
            self._note_ended(request_id)
            if not expected.lent or expected.let_go.is_set():
                self._results.append(MoveResult(request_id, "recv", FAILED, reason))
                return
            expected.cancelled = reason
            self._cancelled[request_id] = expected
        self._drop(request_id, expected, wait_s=_RECORD_WAIT_S)

    def _drop(self, request_id: str, expected: _Expected, wait_s: float = 0.0) -> None:
        """Ask the receiver to drop the transfer. It finds nothing while it is between lending the
        blocks (reserve()) and recording the reservation, a moment without I/O: ask again for up to
        wait_s; poll() keeps asking after that."""
        deadline = time.monotonic() + wait_s
        while not expected.let_go.is_set():
            if self._server.receiver.drop(request_id, "the request was cancelled on the decode instance",
                                          routine=True):
                expected.dropped = True
                return
            if time.monotonic() >= deadline:
                return
            time.sleep(_DROP_RETRY_S)

    def poll(self) -> list[MoveResult]:
        with self._lock:
            undropped = [(rid, e) for rid, e in self._cancelled.items() if not e.dropped]
        for request_id, expected in undropped:
            self._drop(request_id, expected)
        with self._lock:
            results, self._results = self._results, []
        return results

    # ---- BlockAllocator (receiver threads) ----
    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
        num_blocks = -(-num_tokens // self._block_size)
        with self._lock:
            expected = self._expected.get(request_id)
            if expected is None and request_id not in self._ended:
                raise NotRegisteredYet(request_id)  # the sender came before the engine registered it
            if expected is None or expected.lent or num_blocks > len(expected.block_ids):
                return None  # ended, or already lent: nothing to write into
            expected.lent = True
            self._results.append(MoveResult(request_id, "recv", ACTIVE))
            return expected.block_ids[:num_blocks]

    def release(self, request_id: str) -> None:
        self._let_go(request_id)  # the blocks stay the scheduler's: it frees them itself

    def on_transfer_complete(self, request_id: str, first_token_id: int | None = None) -> None:
        with self._lock:
            self._let_go_locked(request_id)
            if self._expected.pop(request_id, None) is not None:
                self._note_ended(request_id)
                self._results.append(MoveResult(request_id, "recv", FINISHED, first_token_id=first_token_id))

    def on_transfer_failed(self, request_id: str, reason: str) -> None:
        with self._lock:
            self._let_go_locked(request_id)
            if self._expected.pop(request_id, None) is not None:
                self._note_ended(request_id)
                self._results.append(MoveResult(request_id, "recv", FAILED, reason))

    def _note_ended(self, request_id: str) -> None:
        """(Under the lock.) A sender asking for it from now on is refused, not told to wait."""
        self._ended[request_id] = None
        if len(self._ended) > _ENDED_MEMORY:
            self._ended.popitem(last=False)

    def _let_go(self, request_id: str) -> None:
        with self._lock:
            self._let_go_locked(request_id)

    def _let_go_locked(self, request_id: str) -> None:
        """The receiver holds none of the request's blocks any more; a cancelled receive ends here."""
        expected = self._expected.get(request_id)
        if expected is not None:
            expected.let_go.set()
        cancelled = self._cancelled.pop(request_id, None)
        if cancelled is not None:
            cancelled.let_go.set()
            self._results.append(MoveResult(request_id, "recv", FAILED, cancelled.cancelled))

    def counter_values(self) -> dict[str, float]:
        return self.counters.snapshot()
