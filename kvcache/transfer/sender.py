"""The prefill side: handshake, reservation, layer-wise chunk sends, acknowledgement, retry, leases.

    begin() ── Reserve ──► TransferHandle ── send_layers(a, b) ─► chunks ─► worker threads:
       │                                                          pin lease, pack_kv into the wire
       │                                                          buffer (or a shm slab), PushChunk
       ├─ RESOURCE_EXHAUSTED: TransferRefusedError, lease released
       └─ NOT_FOUND (the peer has not registered the request yet): Reserve again (kvcache/transfer/reserve.py)
    every layer submitted and every chunk acked ─► Commit (the ack) ─► lease released, result ok
    any failure ─► one retry (Reserve again, resend every submitted layer) ─► failure by policy

With a same-host peer whose pool is in shared memory, a chunk is written straight into the reserved
blocks of the peer's pool instead of being pushed (one-sided, kvcache/transfer/onesided.py): the
peer's CPU sees only Reserve and Commit. A one-sided transfer that ends without success tells the peer
once no write of it runs any more (Abort with writer_stopped), retried by the reaper until answered.

A sending instance of several tensor-parallel ranks gives the sender every rank's cache (mapped into
the endpoint's process); the peer may run another plan, and each chunk then carries exactly one
receiving rank's heads, gathered from the sending ranks that hold them (kvcache/transfer/plans.py).

Nothing here blocks the caller on the wire except begin()'s Reserve and finish().
"""
from __future__ import annotations

import logging
import os
import secrets
import time
from concurrent import futures
from typing import Callable

import grpc
import torch

from kvcache.transfer._proto import kv_transfer_pb2 as pb
from kvcache.transfer.chunking import ChunkRange, cut_at, plan_chunks
from kvcache.transfer.config import TransferConfig
from kvcache.transfer.counters import TransferCounters
from kvcache.transfer.handle import TransferHandle, TransferResult, TransferState
from kvcache.transfer.layout import IncompatibleLayoutError, KVLayout
from kvcache.transfer.lease import LeaseTable
from kvcache.transfer.onesided import OneSidedWrites, ReservationClosedError
from kvcache.transfer.payloads import InlinePayloads, ShmPayloads
from kvcache.transfer.peer import PeerClient, PeerUnavailableError, describe_rpc_error
from kvcache.transfer.plans import HeadCopy, head_routes, pack_rank
from kvcache.transfer.reaper import Reaper
from kvcache.transfer.reserve import reserve
from kvcache.transfer import wire
from kvcache.transfer.shm import SlabPool, host_id
from kvcache.transfer.wire import LAYOUT_TRAILER_KEY
from kvcache.transfer.writers import pid_namespace

logger = logging.getLogger(__name__)


def _ignore(result: TransferResult) -> None:
    pass


class KVSender:
    """Sends KV blocks of kv_cache [num_layers, 2, num_blocks, block_size, Hkv, D] to one peer; with
    tensor parallelism, of every rank's: kv_caches[r] is rank r's, all under one block table.

    release_blocks(request_id) is called exactly once per begun transfer, when its lease ends (ack,
    failure, refusal or expiry), from whichever thread ends it; the engine frees the blocks there.
    token: the deployment's, sent with every call (a peer that checks tokens refuses calls without it).
    """

    def __init__(self, kv_caches: torch.Tensor | list[torch.Tensor], layout: KVLayout, address: str,
                 release_blocks: Callable[[str], None], config: TransferConfig = TransferConfig(),
                 counters: TransferCounters | None = None, token: str | None = None) -> None:
        kv_caches = [kv_caches] if isinstance(kv_caches, torch.Tensor) else list(kv_caches)
        layout.check_caches(kv_caches)
        self.kv_caches = kv_caches
        self.kv_cache = kv_caches[0]  # rank 0's (the one-sided path writes from it: one rank only)
        self.layout = layout
        self.peer_layout = layout  # the receiver's, set by connect()
        self._routes: list[tuple[HeadCopy, ...]] = []  # per receiving TP rank, set by connect()
        # the first layer of each of this side's pipeline stages
        self._src_stage_starts = [layout.rank_layers(stage * layout.tp_size)[0] for stage in range(layout.pp_size)]
        self.config = config
        self.counters = counters or TransferCounters()
        self.sender_id = secrets.token_hex(4)
        self._peer = PeerClient(address, config, token)
        self._leases = LeaseTable(release_blocks, config.lease_ttl_s)
        self._executor = futures.ThreadPoolExecutor(config.num_streams, thread_name_prefix="kv-sender")
        self._handles: dict[str, TransferHandle] = {}
        self._payloads: InlinePayloads | ShmPayloads = InlinePayloads()  # connect() may switch to shm
        self._one_sided: OneSidedWrites | None = None  # connect(): into the peer's shared pool
        self._reaper = Reaper(self._sweep, interval_s=min(1.0, (config.lease_ttl_s or 4.0) / 4),
                              name="kv-sender-reaper")
        self._connected = False
        self._closed = False
        self.max_chunk_bytes = config.max_chunk_bytes  # lowered to the peer's limit by connect()

    @property
    def uses_shm(self) -> bool:
        return self._payloads.uses_shm

    @property
    def one_sided(self) -> bool:
        """Transfers write straight into the peer's shared pool."""
        return self._one_sided is not None

    @property
    def num_open(self) -> int:
        """Transfers begun and not ended."""
        return len(self._handles)

    # ---- connection ----
    def connect(self) -> KVSender:
        """Handshake (IncompatibleLayoutError names each differing field), then map shared memory
        with the peer when both run on one host and enable_shm is set."""
        want_one_sided = (self.config.enable_shm and self.config.one_sided and not self.config.checksum
                          and self.layout.world_size == 1)
        request = pb.HandshakeRequest(layout=self.layout.to_proto(), host_id=host_id(), sender_id=self.sender_id,
                                      want_shm=self.config.enable_shm, want_one_sided=want_one_sided,
                                      pid=os.getpid(), pid_namespace=pid_namespace())
        try:
            response = self._peer.handshake(request, self.config.rpc_timeout_s)
        except grpc.RpcError as e:
            raise self._handshake_error(e) from e
        peer = KVLayout.from_proto(response.layout)
        self.layout.check_compatible(peer, ours="prefill", theirs="decode")
        self.peer_layout, self._routes = peer, head_routes(self.layout, peer)
        self.max_chunk_bytes = min(self.config.max_chunk_bytes, response.max_chunk_bytes)
        if peer.num_bytes_per_layer_block > self.max_chunk_bytes:
            raise ValueError(f"chunks may be at most {self.max_chunk_bytes} bytes (the smaller of this side's "
                             f"and the decode peer's limit), below one block of one layer of a decode rank "
                             f"({peer.num_bytes_per_layer_block}): raise --kv-transfer-max-chunk-bytes")
        if response.HasField("pool") and (self.layout.world_size, peer.world_size) == (1, 1):
            self._one_sided = OneSidedWrites.connect(response.pool, self, self._peer, self._leases)
        if response.shm_ok and self._one_sided is None:
            self._payloads = self._attach_slabs()
        self._reaper.start()
        self._connected = True
        return self

    def _handshake_error(self, error: grpc.RpcError) -> Exception:
        if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
            for key, value in error.trailing_metadata() or ():
                if key == LAYOUT_TRAILER_KEY:
                    theirs = KVLayout.from_proto(pb.KVLayout.FromString(value))
                    return IncompatibleLayoutError(self.layout.differences(theirs, "prefill", "decode"))
        return PeerUnavailableError(f"KV handshake with {self._peer.address} failed: {error.code().name}: "
                                    f"{error.details()}")

    def _attach_slabs(self) -> InlinePayloads | ShmPayloads:
        slabs = SlabPool(self.sender_id, self.config.num_shm_slabs, self.max_chunk_bytes)
        try:
            self._peer.attach_shm(pb.AttachShmRequest(sender_id=self.sender_id, segment_names=slabs.names,
                                                      segment_bytes=slabs.slab_bytes), self.config.rpc_timeout_s)
        except grpc.RpcError as e:
            logger.warning("shared-memory KV path unavailable, using gRPC payloads: %s", e.details())
            slabs.close()
            return InlinePayloads()
        finally:
            slabs.unlink()  # mapped on both sides (or given up): the names can go
        return ShmPayloads(slabs)

    def close(self) -> None:
        """Fail every open transfer, release every lease, unmap shared memory, close channels."""
        if self._closed:
            return
        self._closed = True
        self._reaper.stop()
        for handle in list(self._handles.values()):
            self.fail(handle, "the KV sender is closing", notify_peer=False)
        self._executor.shutdown(wait=True, cancel_futures=True)  # no write runs after this
        if self._payloads.uses_shm or self._one_sided is not None:
            try:  # also: every one-sided reservation of this sender may be given back
                self._peer.detach_shm(pb.DetachShmRequest(sender_id=self.sender_id), timeout_s=1.0)
            except grpc.RpcError:
                pass  # the peer unmaps slabs when it exits, and sees this process exit
        self._payloads.close()
        if self._one_sided is not None:
            self._one_sided.close()
        self._leases.release_all()
        self._peer.close()

    # ---- one transfer ----
    def begin(self, request_id: str, num_tokens: int, src_block_ids: list[int],
              on_done: Callable[[TransferResult], None] = _ignore,
              with_first_token: bool = False, should_stop: Callable[[], bool] = lambda: False) -> TransferHandle:
        """Lease src_block_ids and reserve blocks for num_tokens tokens on the peer (blocks for the
        Reserve RPC; while the peer has not registered the request yet, it asks again until
        rpc_timeout_s passes or should_stop() is true). TransferRefusedError when the peer has no
        room (or never registered the request), PeerUnavailableError when it does not answer; in
        both cases the lease is already released. on_done(result) runs once, on a sender thread,
        when the transfer ends. with_first_token: the commit waits for handle.set_first_token() and
        carries that token to the peer."""
        if not self._connected or self._closed:
            raise RuntimeError("begin() needs a connected KVSender: call connect() first, and not after close()")
        num_blocks = self.layout.num_blocks_for(num_tokens)
        if num_tokens < 1 or len(src_block_ids) != num_blocks:
            raise ValueError(f"{num_tokens} tokens need {num_blocks} blocks of {self.layout.block_size}, "
                             f"got {len(src_block_ids)} block ids")
        block_ids = torch.tensor(src_block_ids, dtype=torch.int64)
        if bool(((block_ids < 0) | (block_ids >= self.kv_cache.shape[2])).any()):  # every rank's: as many
            raise ValueError(f"block ids outside the cache's {self.kv_cache.shape[2]} blocks: {src_block_ids}")
        self._leases.grant(request_id, src_block_ids)
        try:
            request = pb.ReserveRequest(request_id=request_id, num_tokens=num_tokens, num_blocks=num_blocks,
                                        one_sided=self._one_sided is not None, sender_id=self.sender_id)
            reserved = reserve(self._peer, request, self.config, self.counters, should_stop)
            handle = TransferHandle(self, request_id, num_tokens, block_ids, self.layout.num_layers, on_done,
                                    with_first_token)
            if self._one_sided is not None:
                handle.target = self._one_sided.target(handle, reserved)
        except BaseException:
            self._leases.release(request_id)
            raise
        self._handles[request_id] = handle
        return handle

    def submit_layers(self, handle: TransferHandle, layer_start: int, layer_end: int) -> None:
        if not 0 <= layer_start < layer_end <= self.layout.num_layers:
            raise ValueError(f"layers [{layer_start}, {layer_end}) outside the model's {self.layout.num_layers}")
        with handle.lock:
            if bool(handle.layers_submitted[layer_start:layer_end].any()):
                raise ValueError(f"request {handle.request_id!r}: layers [{layer_start}, {layer_end}) overlap "
                                 "layers already sent")
            if handle.state is not TransferState.ACTIVE:
                return
            handle.layers_submitted[layer_start:layer_end] = True
            handle.layer_ranges.append((layer_start, layer_end))
            if handle.restarting:
                return  # the retry resends every submitted range once it has reserved again
            chunks = self._plan(handle, layer_start, layer_end)
            handle.num_outstanding += len(chunks)
            handle.num_in_flight += len(chunks)
            attempt = handle.attempt
        self._submit_chunks(handle, attempt, chunks)

    def _plan(self, handle: TransferHandle, layer_start: int, layer_end: int) -> list[ChunkRange]:
        """The chunks of a layer range: for each receiving rank, its heads of every block of the layers
        its stage holds, cut where a sending stage ends (a chunk comes from one stage's caches)."""
        chunks = []
        for rank in range(self.peer_layout.world_size):
            first, end = self.peer_layout.rank_layers(rank)
            start, stop = max(layer_start, first), min(layer_end, end)
            for piece_start, piece_end in cut_at(start, stop, self._src_stage_starts):
                chunks += plan_chunks(piece_start, piece_end, len(handle.src_block_ids),
                                      self.peer_layout.num_bytes_per_layer_block, self.max_chunk_bytes, rank)
        return chunks

    def _submit_chunks(self, handle: TransferHandle, attempt: int, chunks: list[ChunkRange]) -> None:
        for chunk in chunks:
            try:
                future = self._executor.submit(self._send_chunk, handle, attempt, chunk)
            except RuntimeError:  # the executor is shutting down
                self.fail(handle, "the KV sender is closing", notify_peer=False)
                return
            future.add_done_callback(lambda f, c=chunk: self._chunk_done(handle, attempt, c, f))

    # ---- worker-thread steps ----
    def _send_chunk(self, handle: TransferHandle, attempt: int, chunk: ChunkRange) -> int:
        """Pack one chunk from the leased blocks and push it (or write it into the peer's pool);
        returns its payload bytes."""
        if attempt != handle.attempt:
            return 0  # superseded by a retry, which resends it
        if handle.target is not None:
            return self._one_sided.write_chunk(handle, chunk)
        header = pb.ChunkHeader(request_id=handle.request_id, attempt=attempt, layer_start=chunk.layer_start,
                                layer_end=chunk.layer_end, block_start=chunk.block_start, block_end=chunk.block_end,
                                dst_rank=chunk.rank,
                                num_bytes=chunk.num_layers * chunk.num_blocks * self.peer_layout.num_bytes_per_layer_block)
        if self.config.checksum:
            header.crc32 = 0  # present from the start: its encoded size does not change when set

        def fill(out: torch.Tensor) -> None:
            self._pack(handle, chunk, out)
            if self.config.checksum:
                header.crc32 = wire.payload_crc32(out)

        message, done = self._payloads.encode(header, fill, self.config.rpc_timeout_s)
        try:
            self._peer.push(message, self.config.rpc_timeout_s)
        finally:
            done()
        return header.num_bytes

    def _pack(self, handle: TransferHandle, chunk: ChunkRange, out_bytes: torch.Tensor) -> None:
        """Gather the chunk's blocks, the receiving rank's heads of them, into out_bytes [num_bytes]
        uint8 while holding the lease."""
        lease = self._leases.pin(handle.request_id)
        if lease is None:
            raise RuntimeError(f"the KV lease of request {handle.request_id!r} has ended")
        try:
            out = out_bytes.view(self.layout.torch_dtype).view(
                chunk.num_layers, 2, chunk.num_blocks, *self.peer_layout.block_shape)  # [L', 2, n, bs, Hkv, D]
            dst_tp_rank = chunk.rank % self.peer_layout.tp_size
            stage = self._src_stage_of(chunk.layer_start)
            first = self.layout.rank_layers(stage * self.layout.tp_size)[0]
            pack_rank(self.kv_caches[stage * self.layout.tp_size:(stage + 1) * self.layout.tp_size],
                      self._routes[dst_tp_rank], self.layout, handle.src_block_ids[chunk.block_start:chunk.block_end],
                      chunk.layer_start - first, chunk.layer_end - first, out)
        finally:
            lease.pins.unpin()

    def _chunk_done(self, handle: TransferHandle, attempt: int, chunk: ChunkRange, future: futures.Future) -> None:
        error = "cancelled" if future.cancelled() else future.exception()
        with handle.lock:
            handle.num_in_flight -= 1  # chunks of any attempt: a one-sided commit waits for every write
            if handle.state is not TransferState.ACTIVE:
                return
            current = handle.attempt
            if attempt != current:  # superseded: the current attempt may have been waiting only for it
                ready = handle.target is not None and not handle.restarting and handle.ready_to_commit
            elif error is None:
                handle.num_outstanding -= 1
                handle.num_bytes_acked += future.result()
                if handle.target is not None:
                    handle.target.written.append(chunk)
                ready = handle.ready_to_commit
            else:
                ready = False
        if attempt == current and isinstance(error, ReservationClosedError):
            self.fail(handle, "the decode side dropped the reservation")  # nothing left to retry into
            return
        if attempt == current and error is not None:
            self._retry(handle, f"chunk {chunk} failed: {describe_rpc_error(error)}")
            return
        if attempt == current:
            self.counters.add(num_bytes_sent=future.result())
        if ready:
            self._spawn(handle, self._commit, handle, current)

    def first_token_set(self, handle: TransferHandle) -> None:
        """handle.set_first_token() was called: commit if that was all the transfer waited for."""
        with handle.lock:
            ready = handle.state is TransferState.ACTIVE and not handle.restarting and handle.ready_to_commit
            attempt = handle.attempt
        if ready:
            self._spawn(handle, self._commit, handle, attempt)

    def _commit(self, handle: TransferHandle, attempt: int) -> None:
        with handle.lock:
            if handle.committing == attempt:
                return  # the last ack and the first token both asked for this commit
            handle.committing = attempt
            written = list(handle.target.written) if handle.target is not None else []
        request = pb.CommitRequest(request_id=handle.request_id, attempt=attempt)
        if handle.first_token_id is not None:
            request.first_token_id = handle.first_token_id
        request.written.extend(pb.WrittenRange(layer_start=c.layer_start, layer_end=c.layer_end,
                                               block_start=c.block_start, block_end=c.block_end) for c in written)
        try:
            self._peer.commit(request, self.config.rpc_timeout_s)
        except grpc.RpcError as e:
            self._retry(handle, f"commit failed: {e.code().name}: {e.details()}")
            return
        self._end(handle, ok=True, reason="")

    def _retry(self, handle: TransferHandle, reason: str) -> None:
        """Start the attempt after this one, or fail when retries are used up."""
        with handle.lock:
            if handle.state is not TransferState.ACTIVE or handle.restarting:
                return
            if handle.attempt >= self.config.max_retries:
                out_of_retries = True
            else:
                out_of_retries = False
                handle.attempt += 1
                handle.restarting = True
                attempt = handle.attempt
        if out_of_retries:
            self.fail(handle, reason)
            return
        logger.info("retrying KV transfer of request %s: %s", handle.request_id, reason)
        self.counters.add(num_retries=1)
        self._spawn(handle, self._restart, handle, attempt, reason)

    def _restart(self, handle: TransferHandle, attempt: int, reason: str) -> None:
        """Reserve again under the new attempt (the peer keeps or re-allocates the blocks) and
        resend every layer range submitted so far."""
        request = pb.ReserveRequest(request_id=handle.request_id, num_tokens=handle.num_tokens,
                                    num_blocks=len(handle.src_block_ids), attempt=attempt,
                                    one_sided=handle.target is not None, sender_id=self.sender_id)
        try:
            reserved = self._peer.reserve(request, self.config.rpc_timeout_s)
        except grpc.RpcError as e:
            self.fail(handle, f"{reason}; retry could not reserve: {describe_rpc_error(e)}")
            return
        if handle.target is not None and reserved.ticket != handle.target.ticket:
            # The peer keeps an open reservation on a retry; a new one means the old one was dropped
            # (and waits for this transfer's stop, sent once its writes end). Nothing is written here.
            self._one_sided.never_written(handle.request_id, reserved.ticket, reason)
            self.fail(handle, f"{reason}; the retry was given another reservation")
            return
        with handle.lock:
            if handle.state is not TransferState.ACTIVE or handle.attempt != attempt:
                return
            handle.restarting = False
            chunks = [c for start, end in handle.layer_ranges for c in self._plan(handle, start, end)]
            handle.num_outstanding = len(chunks)
            handle.num_in_flight += len(chunks)
            if handle.target is not None:
                handle.target.written = []
            ready = handle.ready_to_commit
        self._submit_chunks(handle, attempt, chunks)
        if ready:
            self._spawn(handle, self._commit, handle, attempt)

    # ---- ending ----
    def fail(self, handle: TransferHandle, reason: str, notify_peer: bool = True, requested: bool = False) -> None:
        """End the transfer as failed (no-op if it already ended): lease released, peer told.
        requested: the caller gave it up (logged as routine, not as a failure)."""
        if self._end(handle, ok=False, reason=reason, requested=requested) and notify_peer and handle.target is None:
            # (one-sided: the peer is told once no write runs, by OneSidedWrites.writes_stopped)
            abort = pb.AbortRequest(request_id=handle.request_id, reason=reason)
            try:
                self._executor.submit(self._abort_quietly, abort)
            except RuntimeError:
                pass  # closing: the peer drops the transfer after its stall timeout

    def _abort_quietly(self, request: pb.AbortRequest) -> None:
        try:
            self._peer.abort(request, min(self.config.rpc_timeout_s, 2.0))
        except grpc.RpcError:
            pass  # a dead peer has nothing to drop; a live one drops it after its stall timeout

    def _end(self, handle: TransferHandle, ok: bool, reason: str, requested: bool = False) -> bool:
        with handle.lock:
            if handle.state is not TransferState.ACTIVE:
                return False
            handle.state = TransferState.SUCCEEDED if ok else TransferState.FAILED
            seconds = time.monotonic() - handle.started
            result = TransferResult(handle.request_id, ok, handle.num_bytes_acked, seconds, handle.attempt + 1,
                                    "none" if ok else self.config.failure_policy, reason)
            handle.set_result(result)
        self._handles.pop(handle.request_id, None)
        self._leases.release(handle.request_id)
        if handle.target is not None:
            handle.target.writes.close()  # no new write starts; writes_stopped() once none runs
        if ok:
            self.counters.add(num_transfers_sent=1, seconds_sending=seconds,
                              num_one_sided_sent=int(handle.target is not None))
            self.counters.latency.observe(seconds)
        else:
            logger.log(logging.INFO if requested else logging.WARNING, "KV transfer of request %s %s: %s",
                       handle.request_id, "given up" if requested else "failed", reason)
            self.counters.add(num_failed=1)
        try:
            handle.on_done(result)
        except Exception:  # the engine's callback must not break the sender's threads
            logger.exception("on_done callback of request %s raised", handle.request_id)
        return True

    def _spawn(self, handle: TransferHandle, fn: Callable, *args) -> None:
        try:
            self._executor.submit(fn, *args)
        except RuntimeError:
            self.fail(handle, "the KV sender is closing", notify_peer=False)

    def _sweep(self) -> None:
        self._expire_leases()
        if self._one_sided is not None:
            for handle in self._one_sided.dropped(list(self._handles.values())):
                self.fail(handle, "the decode side dropped the reservation")
            self._one_sided.confirm_stops()

    def submit(self, fn: Callable, *args) -> None:
        """Run fn on a sender thread; RuntimeError once the sender is closing."""
        self._executor.submit(fn, *args)

    def _expire_leases(self) -> None:
        for request_id in self._leases.expire():
            self.counters.add(num_leases_expired=1)
            handle = self._handles.get(request_id)
            if handle is not None:
                self.fail(handle, f"KV lease expired after {self.config.lease_ttl_s:g} s without acknowledgement")


    def _src_stage_of(self, layer: int) -> int:
        return max(s for s, first in enumerate(self._src_stage_starts) if first <= layer)
