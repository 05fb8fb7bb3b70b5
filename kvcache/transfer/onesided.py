"""The sender's side of one-sided writes: a same-host decode instance's shared KV pool, mapped here, and
the chunk writes into the blocks that a reservation granted.

    Reserve ─► (dst block ids, slot, ticket) ─► per chunk:  tickets[slot] == ticket?  no ─► stop
                                                             gather src blocks into staging
                                                             tickets[slot] == ticket?  no ─► stop
                                                             scatter into dst blocks, progress[slot] += 1
    all written ─► Commit(ranges written)          any end but success ─► once no write runs:
                                                   Abort(writer_stopped, ticket)

The ticket checks only make a writer stop soon after the receiver closed the reservation. Safety
does not rest on them: the receiver keeps the blocks until this process confirms that no write runs
or will start (the Abort above, sent by the `writes` pins' release) or until this process has exited.
"""
from __future__ import annotations

import logging
import mmap
import queue
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import torch

from pdkernels.ops import pack_kv, unpack_kv
from kvcache.shared_memory import check_name, map_region
from kvcache.transfer._proto import kv_transfer_pb2 as pb
from kvcache.transfer.chunking import ChunkRange
from kvcache.transfer.handle import TransferHandle, TransferState
from kvcache.transfer.layout import KVLayout
from kvcache.transfer.lease import LeaseTable
from kvcache.transfer.peer import PeerClient
from kvcache.transfer.pins import Pins

if TYPE_CHECKING:
    from kvcache.transfer.sender import KVSender

logger = logging.getLogger(__name__)


class ReservationClosedError(RuntimeError):
    """The receiver closed the reservation (dropped it, or it committed): write nothing more."""


@dataclass
class OneSidedTarget:
    """Where one transfer writes, per TransferHandle. Mutable fields are guarded by the handle's lock."""
    dst_block_ids: torch.Tensor      # [num_blocks] int64, block ids in the peer's pool
    slot: int
    ticket: int
    writes: Pins                     # one pin per running chunk write; closed when the transfer ends
    written: list[ChunkRange] = field(default_factory=list)   # chunks written in the current attempt


@dataclass
class _Staging:
    """One write's buffers: the gathered chunk on the source's device and, where the pool is on another
    device, the chunk landed there before the scatter; on a GPU, a stream of its own per device."""
    src: torch.Tensor
    dst: torch.Tensor | None
    src_stream: object | None
    dst_stream: object | None

    @classmethod
    def make(cls, num_bytes: int, src_device: torch.device, dst_device: torch.device) -> _Staging:
        def buffer(device):  # whole 8-byte words: viewable as any KV dtype
            return torch.empty(-(-num_bytes // 8) * 8, dtype=torch.uint8, device=device)

        def stream(device):
            return torch.cuda.Stream(device) if device.type == "cuda" else None
        same = src_device == dst_device
        return cls(buffer(src_device), None if same else buffer(dst_device), stream(src_device),
                   None if same else stream(dst_device))


@contextmanager
def _on(device: torch.device, stream):
    """Run on `stream` of `device` (a GPU); nothing to set in host memory."""
    if stream is None:
        yield
        return
    with torch.cuda.device(device), torch.cuda.stream(stream):
        yield


class PoolWriter:
    """A peer's pool mapped into this process: kv_cache and progress read-write, tickets read-only.
    The kv_cache is host shared memory, or the peer's GPU memory opened by CUDA IPC (kvcache/cuda_ipc.py).
    Thread-safe; at most `num_staging` writes run at once (each needs a staging buffer)."""

    def __init__(self, pool: pb.SharedPool, layout: KVLayout, staging_bytes: int, num_staging: int,
                 timeout_s: float, src_device: torch.device | str = "cpu") -> None:
        """ValueError / OSError / RuntimeError (a GPU pool) when the pool cannot be mapped or does not
        match the layout."""
        check_name(pool.name)
        cache = layout.cache_layout
        if pool.num_blocks < 1 or pool.kv_bytes != pool.num_blocks * cache.bytes_per_block:
            raise ValueError(f"pool {pool.name}: {pool.kv_bytes} bytes do not hold {pool.num_blocks} blocks "
                             f"of {cache.bytes_per_block} bytes")
        if not 0 < 8 * pool.num_slots <= pool.control_bytes:
            raise ValueError(f"pool {pool.name}: {pool.num_slots} control slots in {pool.control_bytes} bytes")
        self.name = pool.name
        self.num_blocks = pool.num_blocks
        self._timeout_s = timeout_s
        self._maps: list[mmap.mmap] = []
        if pool.HasField("cuda"):  # the peer's GPU memory; the file holds the control regions only
            from kvcache import cuda_ipc
            self.kv_cache = cuda_ipc.open_tensor(pool.cuda, cache.shape(pool.num_blocks), layout.torch_dtype)
        else:
            kv_map = map_region(pool.name, 0, pool.kv_bytes, writable=True)
            self._maps.append(kv_map)
            self.kv_cache = torch.frombuffer(kv_map, dtype=layout.torch_dtype, count=pool.kv_bytes // cache.itemsize
                                             ).view(cache.shape(pool.num_blocks))   # [L, 2, num_blocks, bs, Hkv, D]
        tickets_map = map_region(pool.name, pool.tickets_offset, pool.control_bytes, writable=False)
        progress_map = map_region(pool.name, pool.progress_offset, pool.control_bytes, writable=True)
        self._maps += [tickets_map, progress_map]
        self._tickets = memoryview(tickets_map)[:8 * pool.num_slots].cast("q")
        self._progress = memoryview(progress_map)[:8 * pool.num_slots].cast("q")
        self._staging: queue.Queue[_Staging] = queue.Queue()
        for _ in range(num_staging):
            self._staging.put(_Staging.make(staging_bytes, torch.device(src_device), self.kv_cache.device))

    def is_open(self, slot: int, ticket: int) -> bool:
        """The receiver still holds the reservation open (one aligned 8-byte load)."""
        return self._tickets[slot] == ticket

    def check_block_ids(self, block_ids: list[int]) -> None:
        if any(not 0 <= b < self.num_blocks for b in block_ids):
            raise ValueError(f"destination block ids outside the peer's {self.num_blocks} blocks: {block_ids}")

    def write(self, src_cache: torch.Tensor, src_block_ids: torch.Tensor, dst_block_ids: torch.Tensor,
              layer_start: int, layer_end: int, slot: int, ticket: int) -> None:
        """Copy layers [layer_start, layer_end) of src blocks to dst blocks of the pool, if the
        reservation is open. ReservationClosedError otherwise. The caller holds a `writes` pin."""
        if not self.is_open(slot, ticket):
            raise ReservationClosedError("the decode side closed the reservation")
        try:
            staging = self._staging.get(timeout=self._timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no free staging buffer within {self._timeout_s:g} s") from None
        try:
            num_blocks = len(src_block_ids)
            shape = (layer_end - layer_start, 2, num_blocks, *self.kv_cache.shape[3:])   # [L', 2, n, bs, Hkv, D]
            num_elements = shape[0] * 2 * num_blocks * self.kv_cache[0, 0, 0].numel()
            src_device, dst_device = src_cache.device, self.kv_cache.device
            packed = staging.src.view(src_cache.dtype)[:num_elements].view(shape)
            with _on(src_device, staging.src_stream):
                pack_kv(src_cache, src_block_ids.to(src_device), layer_start, layer_end, out=packed)
            if staging.src_stream is not None:
                staging.src_stream.synchronize()
            if not self.is_open(slot, ticket):  # closed during the gather: do not write at all
                raise ReservationClosedError("the decode side closed the reservation")
            with _on(dst_device, staging.dst_stream if staging.dst is not None else staging.src_stream):
                landed = packed
                if staging.dst is not None:  # another device (a peer copy over NVLink or PCIe)
                    landed = staging.dst.view(src_cache.dtype)[:num_elements].view(shape)
                    landed.copy_(packed, non_blocking=True)
                unpack_kv(landed, self.kv_cache, dst_block_ids.to(dst_device), layer_start)
            for stream in (staging.dst_stream, staging.src_stream):
                if stream is not None:  # landed before progress (and so before the Commit) says so
                    stream.synchronize()
            self._progress[slot] += 1  # liveness for the receiver's stall timer; a lost increment is harmless
        finally:
            self._staging.put(staging)

    def close(self) -> None:
        """Unmap (a mapping still viewed by a tensor goes when the last view does)."""
        self.kv_cache = None
        self._tickets.release()
        self._progress.release()
        for mapping in self._maps:
            try:
                mapping.close()
            except BufferError:
                pass
        self._maps.clear()


class OneSidedWrites:
    """A KVSender's one-sided path to one peer: the mapped pool, each transfer's target and chunk
    writes, and telling the peer when the writes of a transfer that did not succeed have stopped."""

    def __init__(self, pool: PoolWriter, sender: KVSender, peer: PeerClient, leases: LeaseTable) -> None:
        self.pool = pool
        self._sender = sender
        self._peer = peer
        self._leases = leases
        self._timeout_s = min(sender.config.rpc_timeout_s, 2.0)
        # Transfers that ended without success whose peer has not yet heard that none of their writes
        # runs: (request id, ticket) -> reason. Sent at once, retried by the sender's reaper.
        self._unconfirmed: dict[tuple[str, int], str] = {}
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, pool: pb.SharedPool, sender: KVSender, peer: PeerClient,
                leases: LeaseTable) -> OneSidedWrites | None:
        """Map the peer's pool; None (logged) when that fails: the sender then sends payloads."""
        try:
            writer = PoolWriter(pool, sender.layout, sender.max_chunk_bytes, sender.config.num_streams,
                                sender.config.rpc_timeout_s, sender.kv_cache.device)
        except (OSError, ValueError, RuntimeError) as e:
            logger.warning("cannot map the KV pool of %s for one-sided writes (%s); sending payloads",
                           peer.address, e)
            return None
        return cls(writer, sender, peer, leases)

    def target(self, handle: TransferHandle, reserved: pb.ReserveResponse) -> OneSidedTarget:
        """Where a transfer writes, from the peer's answer to its Reserve. ValueError if unusable
        (then the peer has been told that nothing will be written)."""
        try:
            if len(reserved.block_ids) != len(handle.src_block_ids):
                raise ValueError(f"{self._peer.address} granted {len(reserved.block_ids)} blocks for a "
                                 f"one-sided transfer of {len(handle.src_block_ids)}")
            self.pool.check_block_ids(list(reserved.block_ids))
        except ValueError as e:
            self.never_written(handle.request_id, reserved.ticket, str(e))
            raise
        return OneSidedTarget(torch.tensor(list(reserved.block_ids), dtype=torch.int64), reserved.slot,
                              reserved.ticket, Pins(lambda: self.writes_stopped(handle)))

    def write_chunk(self, handle: TransferHandle, chunk: ChunkRange) -> int:
        """Write one chunk into the reserved blocks if the transfer and its reservation are still
        open (ReservationClosedError if not); returns its payload bytes. Sender thread."""
        target = handle.target
        if not target.writes.pin():
            raise ReservationClosedError("the transfer has ended")
        try:
            lease = self._leases.pin(handle.request_id)
            if lease is None:
                raise RuntimeError(f"the KV lease of request {handle.request_id!r} has ended")
            try:
                self.pool.write(self._sender.kv_cache, handle.src_block_ids[chunk.block_start:chunk.block_end],
                                target.dst_block_ids[chunk.block_start:chunk.block_end], chunk.layer_start,
                                chunk.layer_end, target.slot, target.ticket)
            finally:
                lease.pins.unpin()
        finally:
            target.writes.unpin()
        return chunk.num_layers * chunk.num_blocks * self._sender.layout.num_bytes_per_layer_block

    def writes_stopped(self, handle: TransferHandle) -> None:
        """The transfer ended and none of its writes runs any more (its `writes` pins released):
        unless it succeeded (the accepted Commit said so), tell the peer."""
        result = handle.poll()
        if result is None or result.ok:
            return
        with self._lock:
            self._unconfirmed[(handle.request_id, handle.target.ticket)] = result.reason
        try:
            self._sender.submit(self.confirm_stops)
        except RuntimeError:
            pass  # closing: DetachShm tells the peer about every transfer of this sender

    def never_written(self, request_id: str, ticket: int, reason: str) -> None:
        """A reservation granted to this sender that it will not write into at all: tell the peer."""
        with self._lock:
            self._unconfirmed[(request_id, ticket)] = reason
        self.confirm_stops()

    def confirm_stops(self) -> None:
        """Send the pending stops (Abort with writer_stopped) until the peer fails to answer one; the
        rest stay for the reaper's next round."""
        with self._lock:
            pending = list(self._unconfirmed.items())
        for (request_id, ticket), reason in pending:
            request = pb.AbortRequest(request_id=request_id, reason=reason, writer_stopped=True, ticket=ticket,
                                      sender_id=self._sender.sender_id)
            try:
                self._peer.abort(request, self._timeout_s)
            except grpc.RpcError as e:  # the others would wait for the same deaf peer: next round
                logger.info("KV peer %s has not taken the stop of request %s yet (%s: %s); retrying",
                            self._peer.address, request_id, e.code().name, e.details())
                return
            with self._lock:
                self._unconfirmed.pop((request_id, ticket), None)

    def dropped(self, handles: list[TransferHandle]) -> list[TransferHandle]:
        """Active transfers whose reservation the peer closed while none of their writes ran to
        notice (e.g. waiting for the first token): the caller fails them, which sends their stop."""
        found = []
        for handle in handles:
            target = handle.target
            if target is None:
                continue
            with handle.lock:  # a commit is sent only after `committing` is set under this lock
                if (handle.state is TransferState.ACTIVE and handle.committing != handle.attempt
                        and not self.pool.is_open(target.slot, target.ticket)):
                    found.append(handle)
        return found

    def close(self) -> None:
        """Assumes no write runs (the sender's executor has shut down)."""
        self.pool.close()
