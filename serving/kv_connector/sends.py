"""Prefill side of the transfer worker: one KVSender per decode peer, one transfer per SendKV move.

The runner calls, on the engine thread and in this order for one step:

    begin(send)              a transfer per request; its handshake and Reserve run on a begin thread
    layers_done(rows, 0, g)  each layer group as the forward pass finishes it: shipped at once if the
    layers_done(rows, g, 2g) transfer has begun, else queued until begin() returns
    tokens_sampled(...)      the first token, which the transfer's commit carries to the peer

so the engine thread never waits on the wire. A send ends (poll(): finished or failed) only when the
peer acknowledged it or it failed *and* no copy still reads its blocks. `cancel` (the scheduler's
lease ran out) fails a transfer wherever it is.

A peer that does not answer is forgotten: its sender is closed, and for `peer_retry_s` new transfers
to that address fail at once instead of each waiting for a handshake that cannot succeed. A restarted
decode instance comes back on a new address; the sender of the old one, idle from then on, is closed
after `idle_close_s` without a transfer.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import torch

from kvcache.transfer import (KVSender, PeerUnavailableError, TransferConfig, TransferCounters,
                              TransferHandle, TransferRefusedError, TransferResult)
from kvcache.transfer.layout import KVLayout
from scheduler.kv_moves import FAILED, FINISHED, MoveResult, SendKV

logger = logging.getLogger(__name__)

_NUM_BEGIN_THREADS = 4
PEER_RETRY_S = 5.0
IDLE_CLOSE_S = 60.0


@dataclass
class _Send:
    """One request's transfer while begin() may still be running."""
    send: SendKV
    lock: threading.Lock = field(default_factory=threading.Lock)
    handle: TransferHandle | None = None
    failed: bool = False
    cancelled: str = ""  # why, if the scheduler cancelled it before begin() returned
    queued: list[tuple[int, int]] = field(default_factory=list)  # layer ranges done before begin() returned
    first_token_id: int | None = None
    released: bool = False  # the lease ended and no copy reads the blocks
    ok: bool | None = None  # the transfer's result, once known
    reason: str = ""

    def send_layers(self, layer_start: int, layer_end: int) -> None:
        with self.lock:
            if self.failed:
                return
            if self.handle is None:
                self.queued.append((layer_start, layer_end))
                return
            handle = self.handle
        handle.send_layers(layer_start, layer_end)

    def set_first_token(self, token_id: int) -> None:
        with self.lock:
            self.first_token_id = token_id
            handle = self.handle
        if handle is not None:
            handle.set_first_token(token_id)

    def started(self, handle: TransferHandle) -> None:
        with self.lock:
            self.handle = handle
            queued, self.queued = self.queued, []
            first_token_id, cancelled = self.first_token_id, self.cancelled
        for layer_start, layer_end in queued:
            handle.send_layers(layer_start, layer_end)
        if first_token_id is not None:
            handle.set_first_token(first_token_id)
        if cancelled:
            handle.abort(cancelled)


class KVSends:
    def __init__(self, config: TransferConfig, token: str | None = None, peer_retry_s: float = PEER_RETRY_S,
                 idle_close_s: float = IDLE_CLOSE_S) -> None:
        self.config = config
        self._token = token  # the deployment's, sent with every call to a decode peer
        self.peer_retry_s = peer_retry_s
        self.idle_close_s = idle_close_s
        self._last_used: dict[str, float] = {}  # peer -> when a transfer to it last began
        self._next_idle_check = 0.0
        self.counters = TransferCounters()
        self._kv_caches: list[torch.Tensor] = []  # one per tensor-parallel rank
        self._layout: KVLayout | None = None
        self._lock = threading.Lock()
        self._senders: dict[str, KVSender] = {}
        self._peer_locks: dict[str, threading.Lock] = {}
        self._dead_peers: dict[str, float] = {}  # address -> until when new transfers fail at once
        self._sends: dict[str, _Send] = {}  # until their result is polled
        self._results: list[MoveResult] = []
        self.num_peers_forgotten = 0
        self._begins = futures.ThreadPoolExecutor(_NUM_BEGIN_THREADS, thread_name_prefix="kv-begin")

    def bind(self, kv_caches: list[torch.Tensor], layout: KVLayout) -> None:
        """Every rank's KV cache (rank r's at index r, mapped into this process) and rank 0's layout."""
        self._kv_caches, self._layout = kv_caches, layout

    # ---- engine thread ----
    def begin(self, send: SendKV) -> None:
        entry = _Send(send)
        with self._lock:
            self._sends[send.request_id] = entry
        self._begins.submit(self._begin, entry)

    def layers_done(self, request_ids: list[str], layer_start: int, layer_end: int) -> None:
        for request_id in request_ids:
            entry = self._sends.get(request_id)
            if entry is not None:
                entry.send_layers(layer_start, layer_end)

    def tokens_sampled(self, token_ids: dict[str, int]) -> None:
        for request_id, token_id in token_ids.items():
            entry = self._sends.get(request_id)
            if entry is not None:
                entry.set_first_token(token_id)

    def has(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._sends

    def cancel(self, request_id: str, reason: str) -> None:
        """Fail the transfer (the peer is told to drop it); its blocks come back through poll() once
        no copy reads them."""
        entry = self._sends.get(request_id)
        if entry is None:
            return
        with entry.lock:
            handle = entry.handle
            if handle is None:
                entry.cancelled = reason  # begin() is still running: started() aborts it
        if handle is not None:
            handle.abort(reason)

    def poll(self) -> list[MoveResult]:
        now = time.monotonic()
        if now >= self._next_idle_check:
            self._next_idle_check = now + 1.0
            self._close_idle(now)
        with self._lock:
            results, self._results = self._results, []
        return results

    def _close_idle(self, now: float) -> None:
        with self._lock:
            idle = [peer for peer, sender in self._senders.items()
                    if sender.num_open == 0 and now - self._last_used.get(peer, now) > self.idle_close_s]
            for peer in idle:
                self._last_used.pop(peer, None)
        for peer in idle:
            self._begins.submit(self._close_sender, peer)

    def _close_sender(self, peer: str) -> None:
        with self._lock:
            sender = self._senders.get(peer)
            if sender is None or sender.num_open:
                return  # used again meanwhile
            del self._senders[peer]
            self.num_peers_forgotten += 1
        logger.info("closing the idle KV sender to %s", peer)
        sender.close()

    # ---- begin threads ----
    def _begin(self, entry: _Send) -> None:
        send = entry.send
        request_id = send.request_id
        try:
            if entry.cancelled:
                raise TransferRefusedError(entry.cancelled)
            sender = self._sender(send.peer)
            # should_stop: cancelled (the router gave up on the request) while the decode instance has
            # not registered it yet (the router starts the prefill while the decode instance reserves)
            handle = sender.begin(request_id, send.num_tokens, send.block_ids, on_done=self._on_done,
                                  with_first_token=True, should_stop=lambda: bool(entry.cancelled))
        except Exception as e:  # noqa: BLE001 - any failure fails this transfer only
            # refused: the decode side no longer expects the request (aborted, or it stopped at its
            # first token), which is routine; anything else is worth an operator's attention
            level = logging.INFO if isinstance(e, TransferRefusedError) else logging.ERROR
            logger.log(level, "KV transfer of request %s to %s did not start: %s", request_id, send.peer, e)
            if isinstance(e, PeerUnavailableError):
                self._forget_peer(send.peer)
            with entry.lock:
                entry.failed = True
            # begin() released the lease before raising (or never took one): the blocks are free
            self._settle(request_id, released=True, ok=False, reason=str(e))
            return
        entry.started(handle)

    def _sender(self, peer: str) -> KVSender:
        with self._lock:
            sender = self._senders.get(peer)
            peer_lock = self._peer_locks.setdefault(peer, threading.Lock())
            self._last_used[peer] = time.monotonic()
        if sender is not None:
            return sender
        with peer_lock:  # one handshake per peer, however many requests wait for it
            with self._lock:
                sender = self._senders.get(peer)
                dead_until = self._dead_peers.get(peer, 0.0)
            if sender is not None:
                return sender
            if time.monotonic() < dead_until:
                raise PeerUnavailableError(f"decode peer {peer} did not answer a moment ago; not trying "
                                           f"again for {self.peer_retry_s:g}s")
            sender = KVSender(self._kv_caches, self._layout, peer, self._released, self.config, self.counters,
                              self._token)
            try:
                sender.connect()  # IncompatibleLayoutError names the fields that differ
            except BaseException as e:
                sender.close()
                if isinstance(e, PeerUnavailableError):  # before the next waiter takes the lock
                    with self._lock:
                        self._dead_peers[peer] = time.monotonic() + self.peer_retry_s
                raise
            with self._lock:
                self._senders[peer] = sender
                self._dead_peers.pop(peer, None)
        return sender

    def _forget_peer(self, peer: str) -> None:
        """A peer that does not answer is likely gone: close its sender (failing its transfers) and
        refuse new transfers to it for a while."""
        with self._lock:
            sender = self._senders.pop(peer, None)
            self._dead_peers[peer] = time.monotonic() + self.peer_retry_s
            self.num_peers_forgotten += sender is not None
        if sender is not None:
            logger.warning("forgetting KV peer %s: it did not answer", peer)
            sender.close()

    # ---- sender threads ----
    def _released(self, request_id: str) -> None:
        self._settle(request_id, released=True)

    def _on_done(self, result: TransferResult) -> None:
        self._settle(result.request_id, ok=result.ok, reason=result.reason)

    def _settle(self, request_id: str, released: bool = False, ok: bool | None = None, reason: str = "") -> None:
        with self._lock:
            entry = self._sends.get(request_id)
            if entry is None:
                return
            entry.released |= released
            if ok is not None and entry.ok is None:
                entry.ok, entry.reason = ok, reason
            if entry.released and entry.ok is not None:
                del self._sends[request_id]
                self._results.append(MoveResult(request_id, "send", FINISHED if entry.ok else FAILED,
                                                entry.reason))

    def close(self) -> None:
        self._begins.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            senders = list(self._senders.values())
            self._senders.clear()
        for sender in senders:
            sender.close()

    def counter_values(self) -> dict[str, float]:
        values = self.counters.snapshot()
        values["num_peers_forgotten"] = self.num_peers_forgotten
        return values
