"""Prefill side of the connector: one KVSender per decode peer, one transfer per finished prompt.

The runner calls, on the engine thread and in this order for one step:

    begin_sends(sends)   a transfer per request; begin() (handshake, Reserve) runs on a begin thread
    layers_done(0, g)    each layer group as the forward pass finishes it: shipped at once if the
    layers_done(g, 2g)   transfer has begun, else queued until begin() returns
    ...

so the engine thread never waits on the wire. A request's blocks go back to the engine (poll():
finished_sending / failed_sending) only when its lease has ended *and* no copy still reads them.
"""
from __future__ import annotations

import logging
import threading
from concurrent import futures
from dataclasses import dataclass, field

import torch

from kvcache.transfer import (KVSender, PeerUnavailableError, TransferConfig, TransferCounters,
                              TransferHandle, TransferRefusedError, TransferResult)
from kvcache.transfer.layout import KVLayout
from scheduler.step import KVSend
from serving.runner.connector import TransferEvents

logger = logging.getLogger(__name__)

_NUM_BEGIN_THREADS = 4


@dataclass
class _Send:
    """One request's transfer while begin() may still be running."""
    send: KVSend
    lock: threading.Lock = field(default_factory=threading.Lock)
    handle: TransferHandle | None = None
    failed: bool = False
    queued: list[tuple[int, int]] = field(default_factory=list)  # layer ranges done before begin() returned

    def send_layers(self, layer_start: int, layer_end: int) -> None:
        with self.lock:
            if self.failed:
                return
            if self.handle is None:
                self.queued.append((layer_start, layer_end))
                return
            handle = self.handle
        handle.send_layers(layer_start, layer_end)

    def started(self, handle: TransferHandle) -> None:
        with self.lock:
            self.handle = handle
            queued, self.queued = self.queued, []
        for layer_start, layer_end in queued:
            handle.send_layers(layer_start, layer_end)


@dataclass
class _Outcome:
    released: bool = False  # the lease ended and no copy reads the blocks
    ok: bool | None = None  # the transfer's result, once known


class KVSends:
    def __init__(self, config: TransferConfig, token: str | None = None) -> None:
        self.config = config
        self._token = token  # the deployment's, sent with every call to a decode peer
        self.counters = TransferCounters()
        self._kv_cache: torch.Tensor | None = None
        self._layout: KVLayout | None = None
        self._lock = threading.Lock()
        self._senders: dict[str, KVSender] = {}
        self._peer_locks: dict[str, threading.Lock] = {}
        self._outcomes: dict[str, _Outcome] = {}
        self._events = TransferEvents()
        self._step: list[_Send] = []
        self._begins = futures.ThreadPoolExecutor(_NUM_BEGIN_THREADS, thread_name_prefix="kv-begin")

    def bind(self, kv_cache: torch.Tensor, layout: KVLayout) -> None:
        self._kv_cache, self._layout = kv_cache, layout

    # ---- engine thread ----
    def begin_sends(self, sends: list[KVSend]) -> None:
        self._step = [_Send(s) for s in sends]
        for send in self._step:
            with self._lock:
                self._outcomes[send.send.request_id] = _Outcome()
            self._begins.submit(self._begin, send)

    def layers_done(self, layer_start: int, layer_end: int) -> None:
        for send in self._step:
            send.send_layers(layer_start, layer_end)

    def poll(self) -> TransferEvents:
        """Ended transfers since the last poll. One that ends within the step that began it (a small
        prompt) is fine: the scheduler applies send events after it has leased that step's requests."""
        self._step = []
        with self._lock:
            events, self._events = self._events, TransferEvents()
        return events

    # ---- begin threads ----
    def _begin(self, send: _Send) -> None:
        request_id = send.send.request_id
        num_blocks = self._layout.num_blocks_for(send.send.num_tokens)
        try:
            sender = self._sender(send.send.peer)
            handle = sender.begin(request_id, send.send.num_tokens, send.send.block_ids[:num_blocks],
                                  on_done=self._on_done)
        except Exception as e:  # noqa: BLE001 - any failure fails this transfer only
            # refused: the decode side no longer expects the request (aborted, or it stopped at its
            # first token), which is routine; anything else is worth an operator's attention
            level = logging.INFO if isinstance(e, TransferRefusedError) else logging.ERROR
            logger.log(level, "KV transfer of request %s to %s did not start: %s", request_id,
                       send.send.peer, e)
            if isinstance(e, PeerUnavailableError):
                self._drop_sender(send.send.peer)
            with send.lock:
                send.failed = True
            # begin() released the lease before raising (or never took one): the blocks are free
            self._settle(request_id, released=True, ok=False)
            return
        send.started(handle)

    def _sender(self, peer: str) -> KVSender:
        with self._lock:
            sender = self._senders.get(peer)
            peer_lock = self._peer_locks.setdefault(peer, threading.Lock())
        if sender is not None:
            return sender
        with peer_lock:  # one handshake per peer, however many requests wait for it
            with self._lock:
                sender = self._senders.get(peer)
            if sender is None:
                sender = KVSender(self._kv_cache, self._layout, peer, self._released, self.config,
                                  self.counters, self._token)
                try:
                    sender.connect()  # IncompatibleLayoutError names the fields that differ
                except BaseException:
                    sender.close()
                    raise
                with self._lock:
                    self._senders[peer] = sender
        return sender

    def _drop_sender(self, peer: str) -> None:
        """A peer that does not answer is likely gone (a restarted instance gets a new address)."""
        with self._lock:
            sender = self._senders.pop(peer, None)
        if sender is not None:
            sender.close()

    # ---- sender threads ----
    def _released(self, request_id: str) -> None:
        self._settle(request_id, released=True)

    def _on_done(self, result: TransferResult) -> None:
        self._settle(result.request_id, ok=result.ok)

    def _settle(self, request_id: str, released: bool = False, ok: bool | None = None) -> None:
        with self._lock:
            outcome = self._outcomes.get(request_id)
            if outcome is None:
                return
            outcome.released |= released
            if ok is not None:
                outcome.ok = ok
            if outcome.released and outcome.ok is not None:
                del self._outcomes[request_id]
                ended = self._events.finished_sending if outcome.ok else self._events.failed_sending
                ended.append(request_id)

    def close(self) -> None:
        self._begins.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            senders = list(self._senders.values())
            self._senders.clear()
        for sender in senders:
            sender.close()

    def counter_values(self) -> dict[str, float]:
        return self.counters.snapshot()
