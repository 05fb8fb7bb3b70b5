"""The decode side: a gRPC servicer that reserves blocks, writes received chunks into them and acks.

One request's reservation on this side:

    Reserve ──► blocks held, nothing received ──► chunks written (any order, concurrently)
       │              │                                   │
       │              └── no progress for stall_timeout ──┴──► dropped: release + on_transfer_failed
       └── allocator has no room: RESOURCE_EXHAUSTED (backpressure, nothing held)
    Commit with every (layer, block) written ──► on_transfer_complete; the blocks now belong to the
                                                 engine's request (never released from here)

Coverage is tracked per (rank, layer, block) so chunks may arrive in any order and split any way;
an instance of several tensor-parallel ranks receives each rank's heads in chunks of their own
(ChunkHeader.dst_rank), written into that rank's cache, mapped into this process.

One-sided reservations (same host, pool in shared memory, kvcache/transfer/writers.py): the sender
writes the blocks itself and its Commit lists what it wrote. Such a reservation holds one more pin,
the writer's, released only by an accepted Commit, by the writer's word that it stopped (Abort with
writer_stopped, or DetachShm), or by the writer's process exiting. A drop closes the reservation's
control slot at once but gives the blocks back only after that pin is released; until then they are
quarantined (counted):

    drop ─► tickets[slot] = 0 ─► writer stops before its next chunk ─► Abort(writer_stopped) ─┐
                                                   writer's process exits (pidfd readable) ───┴► release
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import grpc
import torch

from pdkernels.ops import unpack_kv
from kvcache.shared_pool import SharedKVPool
from kvcache.transfer import wire
from kvcache.transfer._proto import kv_transfer_pb2 as pb
from kvcache.transfer.config import TransferConfig
from kvcache.transfer.counters import TransferCounters
from kvcache.transfer.layout import KVLayout
from kvcache.transfer.pins import Pins
from kvcache.transfer.reaper import Reaper
from kvcache.transfer.reservation import BlockAllocator, NotRegisteredYet, RpcError, Reservation
from kvcache.transfer.shm import ShmAttachments, host_id
from kvcache.transfer.writers import OneSidedWriters

logger = logging.getLogger(__name__)


class KVReceiver:
    """Writes received KV into kv_cache [num_layers, 2, num_blocks, block_size, Hkv, D] in place; with
    tensor parallelism into every rank's: kv_caches[r] is rank r's, all under one block table.

    The gRPC wiring is in kvcache.transfer.server; the methods here take plain messages and raise
    RpcError for refusals. Start with start(), stop with close().
    """

    def __init__(self, kv_caches: torch.Tensor | list[torch.Tensor], layout: KVLayout, allocator: BlockAllocator,
                 config: TransferConfig = TransferConfig(), counters: TransferCounters | None = None,
                 clock: Callable[[], float] = time.monotonic, pool: SharedKVPool | None = None) -> None:
        """pool: the shared-memory pool kv_cache lives in (KVCacheLayout.allocate_shared), which lets
        same-host senders write into it themselves (one rank only); the receiver owns it from here
        (close() removes its name)."""
        kv_caches = [kv_caches] if isinstance(kv_caches, torch.Tensor) else list(kv_caches)
        layout.check_caches(kv_caches)
        kv_cache = kv_caches[0]
        if pool is not None and (pool.tensor.data_ptr() != kv_cache.data_ptr() or layout.world_size != 1):
            raise ValueError("the shared pool given to KVReceiver is not the one kv_cache lives in, or the "
                             "instance has several ranks (one-sided writes fill one rank's pool)")
        self.kv_caches = kv_caches
        self.kv_cache = kv_cache
        # [ranks, num_layers]: the (rank, layer) pairs a transfer must fill: each rank its stage's layers
        self._required = torch.zeros(layout.world_size, layout.num_layers, dtype=torch.bool)
        for rank in range(layout.world_size):
            self._required[rank, slice(*layout.rank_layers(rank))] = True
        self.layout = layout
        self.allocator = allocator
        self.config = config
        self.counters = counters or TransferCounters()
        self.host_id = host_id()
        self._clock = clock
        self._lock = threading.Lock()
        self._reservations: dict[str, Reservation] = {}
        self._draining: dict[str, Reservation] = {}  # ended, a copy still in flight
        self._shm = ShmAttachments()
        self._writers = OneSidedWriters(pool) if pool is not None else None
        self._reaper = Reaper(self.sweep, interval_s=min(1.0, config.stall_timeout_s / 4), name="kv-receiver-reaper")

    def start(self) -> None:
        self._reaper.start()

    def close(self) -> None:
        """Drop every open transfer (its blocks are released) and unmap shared memory."""
        self._reaper.stop()
        with self._lock:
            request_ids = list(self._reservations)
        for request_id in request_ids:
            self.drop(request_id, "the decode instance is shutting down")
        # Nothing will use the blocks any more (the engine is closing): writers' pins go too.
        with self._lock:
            pinned = [r for r in self._draining.values() if r.writer_pinned]
        for reservation in pinned:
            self._release_writer_pin(reservation)
        self._shm.close()
        if self._writers is not None:
            self._writers.close()

    @property
    def num_open(self) -> int:
        with self._lock:
            return len(self._reservations)

    @property
    def num_quarantined_blocks(self) -> int:
        """Blocks of dropped one-sided reservations waiting for their writer to stop or exit."""
        with self._lock:
            return sum(len(r.block_ids) for r in self._draining.values() if r.quarantined and r.writer_pinned)

    # ---- handshake and shared memory ----
    def handshake(self, request: pb.HandshakeRequest) -> pb.HandshakeResponse:
        """RpcError(FAILED_PRECONDITION) naming each differing layout field, prefill vs decode."""
        try:
            theirs = KVLayout.from_proto(request.layout)
        except ValueError as e:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid KV layout from the sender: {e}") from e
        differences = theirs.incompatibilities(self.layout, ours="prefill", theirs="decode")
        if differences:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION,
                           "incompatible KV layout: " + "; ".join(differences),
                           ((wire.LAYOUT_TRAILER_KEY, self.layout.to_proto().SerializeToString()),))
        shm_ok = self.config.enable_shm and request.want_shm and request.host_id == self.host_id
        response = pb.HandshakeResponse(layout=self.layout.to_proto(), host_id=self.host_id, shm_ok=shm_ok,
                                        max_chunk_bytes=self.config.max_chunk_bytes)
        if self._admit_writer(request):
            try:
                response.pool.CopyFrom(self._writers.pool_message())
            except RuntimeError as e:  # a GPU pool the driver would not export: the sender sends payloads
                logger.warning("cannot export the KV pool to sender %s for one-sided writes (%s)",
                               request.sender_id, e)
                self._writers.forget(request.sender_id)
        return response

    def _admit_writer(self, request: pb.HandshakeRequest) -> bool:
        """Offer the pool to a same-host sender that asked for it and whose process can be watched.
        Not with checksums: only a receiver that sees the bytes can verify them before they land."""
        if not (self._writers is not None and self.config.enable_shm and self.config.one_sided
                and not self.config.checksum and request.want_one_sided and request.host_id == self.host_id
                and request.layout.tp_size <= 1 and request.layout.pp_size <= 1):
            return False
        refusal = self._writers.admit(request.sender_id, request.pid, request.pid_namespace)
        if refusal:
            logger.info("KV sender %s (pid %d) may not write into the shared pool: %s; it sends payloads",
                        request.sender_id, request.pid, refusal)
        return not refusal

    def attach_shm(self, request: pb.AttachShmRequest) -> pb.AttachShmResponse:
        if not self.config.enable_shm:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, "shared memory is disabled on this receiver")
        try:
            self._shm.attach(request.sender_id, list(request.segment_names), request.segment_bytes)
        except (OSError, ValueError) as e:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"cannot map the sender's shared memory: {e}")
        return pb.AttachShmResponse()

    def detach_shm(self, request: pb.DetachShmRequest) -> pb.DetachShmResponse:
        """The sender is closing: its slabs are unmapped and, one-sided, it writes nothing any more."""
        self._shm.detach(request.sender_id)
        self._writer_gone(request.sender_id, "the sender closed")
        return pb.DetachShmResponse()

    # ---- one transfer ----
    def reserve(self, request: pb.ReserveRequest) -> pb.ReserveResponse:
        """Allocate the request's blocks (or, on a retry, keep them and start coverage over).
        RpcError(RESOURCE_EXHAUSTED) when the allocator has no room."""
        num_blocks = self.layout.num_blocks_for(request.num_tokens)
        if request.num_tokens < 1 or request.num_blocks != num_blocks:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{request.num_tokens} tokens need {num_blocks} blocks of {self.layout.block_size}, "
                           f"the sender announced {request.num_blocks}")
        if request.one_sided and (self._writers is None or self._writers.get(request.sender_id) is None):
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"sender {request.sender_id!r} was not offered "
                           "one-sided writes at its handshake")
        restarted = self._restart(request.request_id, request.attempt, request.sender_id if request.one_sided else "")
        if restarted is not None:
            return self._reserve_response(restarted)
        try:
            block_ids = self.allocator.reserve(request.request_id, request.num_tokens)
        except NotRegisteredYet:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"request {request.request_id!r} is not registered on this "
                           "decode instance yet; ask again") from None
        if block_ids is None:
            self.counters.add(num_refused=1)
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"no room for {num_blocks} KV blocks of request {request.request_id!r}; retry later")
        if len(block_ids) != num_blocks:
            self.allocator.release(request.request_id)
            raise RpcError(grpc.StatusCode.INTERNAL, f"the allocator returned {len(block_ids)} blocks for "
                           f"{request.num_tokens} tokens, expected {num_blocks}")
        now = self._clock()
        reservation = Reservation(request.request_id, torch.tensor(block_ids, dtype=torch.int64),
                                   request.attempt,
                                   torch.zeros(self.layout.world_size, self.layout.num_layers, num_blocks,
                                               dtype=torch.bool),
                                   now, now)
        reservation.pins = Pins(lambda: self._finalize(reservation))
        if request.one_sided:
            slot = self._writers.open_slot()
            if slot is None:  # cannot happen: one slot per block, and each reservation holds a block
                self.allocator.release(request.request_id)
                raise RpcError(grpc.StatusCode.INTERNAL, "no free control slot for a one-sided transfer")
            reservation.slot, reservation.ticket = slot
            reservation.writer, reservation.writer_pinned = request.sender_id, reservation.pins.pin()
        with self._lock:
            self._reservations[request.request_id] = reservation
        if request.one_sided and self._writers.get(request.sender_id) is None:  # gone meanwhile
            self._release_writer_pin(reservation)
            self._drop(reservation, "the sender's process exited", routine=True)
            raise RpcError(grpc.StatusCode.ABORTED, f"sender {request.sender_id!r} is gone")
        return self._reserve_response(reservation)

    @staticmethod
    def _reserve_response(reservation: Reservation) -> pb.ReserveResponse:
        response = pb.ReserveResponse(num_blocks=len(reservation.block_ids))
        if reservation.writer:
            response.block_ids.extend(reservation.block_ids.tolist())
            response.slot, response.ticket = reservation.slot, reservation.ticket
        return response

    def _restart(self, request_id: str, attempt: int, writer: str) -> Reservation | None:
        """A retry of an open transfer: keep its blocks (and its writer's slot), forget what arrived.
        None if none is open."""
        with self._lock:
            if request_id in self._draining:
                raise RpcError(grpc.StatusCode.ABORTED, f"request {request_id!r}: the previous transfer is "
                               "still being dropped; retry later")
            reservation = self._reservations.get(request_id)
            if reservation is None:
                return None
            if reservation.writer != writer:
                raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"request {request_id!r} is being "
                               "transferred by another sender or another way")
            # Late chunks of the old attempt are refused by their attempt number from now on.
            reservation.attempt = attempt
            reservation.written.zero_()
            reservation.num_bytes = 0
            reservation.last_progress = self._clock()
            return reservation

    def _holds(self, rank: int, layer_start: int, layer_end: int) -> bool:
        first, end = self.layout.rank_layers(rank)
        return first <= layer_start and layer_end <= end

    def push_chunk(self, message: bytes) -> pb.ChunkAck:
        """Write one chunk (inline or in shared memory) into the reserved blocks."""
        try:
            header, payload = wire.parse_chunk(message)
        except Exception as e:  # noqa: BLE001 - any decoding failure is the sender's malformed message
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed KVChunk: {e}") from e
        reservation = self._pin(header.request_id, header.attempt)
        try:
            buffer = self._payload(header, payload, len(reservation.block_ids))
            if header.HasField("crc32") and wire.payload_crc32(buffer) != header.crc32:
                self.counters.add(num_checksum_mismatches=1)
                logger.error("KV chunk of request %s (layers %d-%d, blocks %d-%d) does not match its "
                             "checksum: refused", header.request_id, header.layer_start, header.layer_end,
                             header.block_start, header.block_end)
                raise RpcError(grpc.StatusCode.DATA_LOSS, f"KV chunk of request {header.request_id!r} "
                               "does not match its CRC-32: nothing was written")
            dst_block_ids = reservation.block_ids[header.block_start:header.block_end]     # [n]
            first_layer = self.layout.rank_layers(header.dst_rank)[0]  # the rank's cache starts at its stage
            cache = self.kv_caches[header.dst_rank]
            unpack_kv(buffer, cache, dst_block_ids, header.layer_start - first_layer)
            if header.dst_rank and cache.is_cuda:  # another rank's process reads it: written before it counts
                torch.cuda.synchronize(cache.device)
            with self._lock:
                if reservation.attempt == header.attempt:
                    reservation.written[header.dst_rank, header.layer_start:header.layer_end,
                                        header.block_start:header.block_end] = True
                    reservation.num_bytes += header.num_bytes
                    reservation.last_progress = self._clock()
        finally:
            reservation.pins.unpin()
        return pb.ChunkAck(num_bytes_written=header.num_bytes)

    def _pin(self, request_id: str, attempt: int) -> Reservation:
        with self._lock:
            reservation = self._reservations.get(request_id)
            if reservation is None:
                raise RpcError(grpc.StatusCode.NOT_FOUND, f"no open transfer for request {request_id!r} "
                               "(never reserved, or dropped after a stall or an abort)")
            if reservation.attempt != attempt:
                raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"chunk of attempt {attempt} for request "
                               f"{request_id!r}, which is at attempt {reservation.attempt}")
            if reservation.writer:
                raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"request {request_id!r} is written "
                               "one-sided: its sender writes into the shared pool, not with PushChunk")
            if not reservation.pins.pin():
                raise RpcError(grpc.StatusCode.NOT_FOUND, f"the transfer of request {request_id!r} was dropped")
            reservation.last_progress = self._clock()
            return reservation

    def _payload(self, header: pb.ChunkHeader, payload: memoryview, num_blocks: int) -> torch.Tensor:
        """The chunk as [L', 2, n, block_size, Hkv, D], viewed in place; RpcError if it does not fit."""
        num_layers = header.layer_end - header.layer_start
        num_chunk_blocks = header.block_end - header.block_start
        if not (0 <= header.layer_start < header.layer_end <= self.layout.num_layers
                and 0 <= header.block_start < header.block_end <= num_blocks
                and header.dst_rank < self.layout.world_size
                and self._holds(header.dst_rank, header.layer_start, header.layer_end)):
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"chunk layers [{header.layer_start}, {header.layer_end}) blocks [{header.block_start}, "
                           f"{header.block_end}) rank {header.dst_rank} outside {self.layout.num_layers} layers x "
                           f"{num_blocks} blocks x {self.layout.world_size} ranks (each its stage's layers)")
        expected = num_layers * num_chunk_blocks * self.layout.num_bytes_per_layer_block
        if header.num_bytes != expected:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"chunk announces {header.num_bytes} bytes, its ranges need {expected}")
        if header.HasField("shm"):
            try:
                flat = self._shm.view(header.shm.segment_name, header.shm.offset, expected)
            except (KeyError, ValueError) as e:
                raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"bad shared-memory handle: {e}") from e
            flat = flat.view(self.layout.torch_dtype)
        elif len(payload) != expected:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"chunk payload is {len(payload)} bytes, "
                           f"its header announces {expected}")
        else:
            flat = wire.view_payload(payload, self.layout.torch_dtype)
        return flat.view(num_layers, 2, num_chunk_blocks, *self.layout.block_shape)

    def commit(self, request: pb.CommitRequest) -> pb.CommitResponse:
        """The acknowledgement: succeeds only when every (layer, block) was written, and hands the
        blocks to the engine (on_transfer_complete). RpcError(FAILED_PRECONDITION) names what is missing."""
        with self._lock:
            reservation = self._reservations.get(request.request_id)
            if reservation is None:
                raise RpcError(grpc.StatusCode.NOT_FOUND, f"no open transfer for request {request.request_id!r}")
            if reservation.attempt != request.attempt:
                raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"commit of attempt {request.attempt}, "
                               f"the transfer is at attempt {reservation.attempt}")
            if reservation.writer:
                self._mark_written(reservation, request.written)
            missing = self._required[:, :, None] & ~reservation.written           # [ranks, L, n]
            missing_layers = missing.any(dim=2).any(dim=0).nonzero().flatten().tolist()
            if missing_layers:
                raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"request {request.request_id!r} is "
                               f"incomplete: layers {missing_layers} are missing blocks")
            reservation.first_token_id = request.first_token_id if request.HasField("first_token_id") else None
            self._end(reservation, "complete")
        seconds = self._clock() - reservation.started
        self.counters.add(num_transfers_received=1, num_bytes_received=reservation.num_bytes,
                          seconds_receiving=seconds, num_one_sided_received=int(bool(reservation.writer)))
        self.counters.latency.observe(seconds)
        reservation.pins.close()
        # The writer commits only after its last write of the reservation, and writes none after.
        self._release_writer_pin(reservation)
        return pb.CommitResponse(num_bytes_received=reservation.num_bytes)

    def _mark_written(self, reservation: Reservation, ranges) -> None:
        """Coverage of a one-sided attempt, from the ranges its Commit lists (caller holds the lock)."""
        num_blocks = len(reservation.block_ids)
        reservation.written.zero_()
        for r in ranges:
            if not (0 <= r.layer_start < r.layer_end <= self.layout.num_layers
                    and 0 <= r.block_start < r.block_end <= num_blocks):
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"written range layers [{r.layer_start}, {r.layer_end}) blocks [{r.block_start}, "
                               f"{r.block_end}) outside {self.layout.num_layers} layers x {num_blocks} blocks")
            reservation.written[0, r.layer_start:r.layer_end, r.block_start:r.block_end] = True
        reservation.num_bytes = int(reservation.written.sum()) * self.layout.num_bytes_per_layer_block

    def abort(self, request: pb.AbortRequest) -> pb.AbortResponse:
        """The sender gave up. writer_stopped (one-sided): it also writes nothing more into the
        reservation `ticket`, whose blocks may come back."""
        if not request.writer_stopped:
            self.drop(request.request_id, f"aborted by the sender: {request.reason}", routine=True)
            return pb.AbortResponse()
        with self._lock:
            reservation = self._reservations.get(request.request_id) or self._draining.get(request.request_id)
        if reservation is None or (reservation.writer, reservation.ticket) != (request.sender_id, request.ticket):
            return pb.AbortResponse()  # ended already (e.g. its writer's process was seen to exit)
        self._release_writer_pin(reservation)  # first: an open one is then dropped without quarantine
        self._drop(reservation, f"aborted by the sender: {request.reason}", routine=True)
        return pb.AbortResponse()

    # ---- dropping ----
    def drop(self, request_id: str, reason: str, routine: bool = False) -> bool:
        """End an open transfer: its blocks are released (once no copy is writing them) and
        on_transfer_failed is called. False when no such transfer is open."""
        with self._lock:
            reservation = self._reservations.get(request_id)
        return reservation is not None and self._drop(reservation, reason, routine)

    def _drop(self, reservation: Reservation, reason: str, routine: bool) -> bool:
        """drop() of this very reservation; False if it is not open any more."""
        request_id = reservation.request_id
        with self._lock:
            if self._reservations.get(request_id) is not reservation:
                return False
            self._end(reservation, reason)
            reservation.routine = routine
            reservation.quarantined = reservation.writer_pinned
        self.counters.add(num_failed=1)
        if reservation.quarantined:
            self.counters.add(num_blocks_quarantined=len(reservation.block_ids))
            writer = self._writers.get(reservation.writer)
            logger.log(logging.INFO if routine else logging.WARNING, "KV transfer of request %s dropped (%s): its "
                       "%d blocks stay quarantined until the writer (pid %s) confirms it stopped or exits",
                       request_id, reason, len(reservation.block_ids), writer.pid if writer else "?")
        reservation.pins.close()
        return True

    def sweep(self) -> None:
        """The reaper's round: writers that exited, then stalls."""
        if self._writers is not None:
            for writer in self._writers.exited():
                self._writer_gone(writer.sender_id, f"the process writing it (pid {writer.pid}) exited")
        self.drop_stalled()

    def drop_stalled(self) -> list[str]:
        """Drop every transfer without progress for stall_timeout_s; returns their request ids.
        A one-sided writer's progress is the count it keeps in the reservation's control slot."""
        now = self._clock()
        deadline = now - self.config.stall_timeout_s
        with self._lock:
            for r in self._reservations.values():
                if r.writer and self._writers.progress(r.slot) != r.progress_seen:
                    r.progress_seen, r.last_progress = self._writers.progress(r.slot), now
            stalled = [r.request_id for r in self._reservations.values() if r.last_progress < deadline]
        dropped = [rid for rid in stalled
                   if self.drop(rid, f"no progress for {self.config.stall_timeout_s:g} s")]
        self.counters.add(num_stalled=len(dropped))
        return dropped

    def _end(self, reservation: Reservation, outcome: str) -> None:
        """Move an open reservation to draining (caller holds the lock); a one-sided writer stops
        before its next chunk."""
        reservation.outcome = outcome
        del self._reservations[reservation.request_id]
        self._draining[reservation.request_id] = reservation
        if reservation.writer:
            self._writers.close_slot(reservation.slot)

    def _release_writer_pin(self, reservation: Reservation) -> None:
        """The writer of a one-sided reservation writes nothing more into it (once per reservation)."""
        with self._lock:
            if not reservation.writer_pinned:
                return
            reservation.writer_pinned = False
        if reservation.quarantined:
            self.counters.add(num_blocks_released_from_quarantine=len(reservation.block_ids))
        reservation.pins.unpin()

    def _writer_gone(self, sender_id: str, reason: str) -> None:
        """The writer stopped for good (it closed, or its process exited): drop what it was writing
        and give back every block it held."""
        # Forget first, then collect: a reservation being made for this writer right now is either
        # collected here or sees the writer gone itself (reserve()).
        if self._writers is None or not self._writers.forget(sender_id):
            return
        with self._lock:
            mine = [r for r in [*self._reservations.values(), *self._draining.values()] if r.writer == sender_id]
        for reservation in mine:
            self._release_writer_pin(reservation)  # first: an open one is dropped without quarantine
            self._drop(reservation, reason, routine=reason == "the sender closed")

    def _finalize(self, reservation: Reservation) -> None:
        """Runs once no copy touches the blocks any more: hand them over, or give them back."""
        with self._lock:
            self._draining.pop(reservation.request_id, None)
        if reservation.writer:
            self._writers.free_slot(reservation.slot)
        if reservation.outcome == "complete":
            self.allocator.on_transfer_complete(reservation.request_id, reservation.first_token_id)
            return
        logger.log(logging.INFO if reservation.routine else logging.WARNING, "KV transfer of request %s dropped: %s",
                   reservation.request_id, reservation.outcome)
        self.allocator.release(reservation.request_id)
        self.allocator.on_transfer_failed(reservation.request_id, reservation.outcome)
