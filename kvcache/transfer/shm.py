"""Same-host fast path: payloads in POSIX shared memory, gRPC carrying only (segment, offset).

The sender owns a few fixed slabs, each one chunk long, and reuses them: pack_kv writes a chunk
into a free slab, the receiver's unpack_kv reads it from its own mapping of the same pages, and the
chunk's acknowledgement frees the slab. No name outlives the handshake:

    sender: create slabs ─► AttachShm RPC ─► receiver maps them ─► reply ─► sender unlinks the names

after which the memory lives exactly as long as one of the two processes maps it, so a crash on
either side leaves nothing in /dev/shm.
"""
from __future__ import annotations

import _posixshmem
import hashlib
import mmap
import os
import queue
import secrets
import socket
import threading
from dataclasses import dataclass
from multiprocessing import shared_memory

import torch


def host_id() -> str:
    """Equal for two processes exactly when they can share POSIX shared memory.

    Hostname and boot id tell hosts (and reboots) apart; the identity of the /dev/shm mount tells
    apart containers that share a kernel but not an IPC namespace.
    """
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
        shm_stat = os.stat("/dev/shm")
        parts.append(f"{shm_stat.st_dev}:{shm_stat.st_ino}")
    except OSError:
        parts.append(f"pid-namespace-unknown-{os.getpid()}")  # never matches another process
    return hashlib.sha1("|".join(parts).encode()).hexdigest()


@dataclass
class Slab:
    index: int
    segment: shared_memory.SharedMemory

    def view(self, num_bytes: int) -> torch.Tensor:
        """[num_bytes] uint8 over the start of the slab."""
        return torch.frombuffer(self.segment.buf, dtype=torch.uint8, count=num_bytes)


class SlabPool:
    """The sender's slabs. acquire() blocks (with a timeout) while every slab is in flight."""

    def __init__(self, sender_id: str, num_slabs: int, slab_bytes: int) -> None:
        self.slab_bytes = slab_bytes
        self._free: queue.Queue[Slab] = queue.Queue()
        self._slabs: list[Slab] = []
        self._unlinked = False
        try:
            for index in range(num_slabs):
                name = f"pdkv_{sender_id}_{index}_{secrets.token_hex(4)}"
                self._slabs.append(Slab(index, shared_memory.SharedMemory(name, create=True, size=slab_bytes)))
        except BaseException:
            self.close()
            raise
        for slab in self._slabs:
            self._free.put(slab)

    @property
    def names(self) -> list[str]:
        return [slab.segment.name for slab in self._slabs]

    def by_name(self) -> dict[str, Slab]:
        return {slab.segment.name: slab for slab in self._slabs}

    def acquire(self, timeout_s: float) -> Slab | None:
        try:
            return self._free.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def release(self, slab: Slab) -> None:
        self._free.put(slab)

    def unlink(self) -> None:
        """Remove the names (once the receiver has mapped them, or when giving up on shm)."""
        if self._unlinked:
            return
        self._unlinked = True
        for slab in self._slabs:
            try:
                slab.segment.unlink()
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self.unlink()
        for slab in self._slabs:
            slab.segment.close()
        self._slabs.clear()


class _Mapping:
    """A read-write mapping of someone else's segment.

    Not multiprocessing's SharedMemory: attaching with it (before Python 3.13) registers the name
    with the resource tracker, which spawned children share with their parent, so the tracker would
    unlink or double-unregister the creator's segment.
    """

    def __init__(self, name: str) -> None:
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        try:
            self.size = os.fstat(fd).st_size
            self._mmap = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        self.name = name
        self.buf = memoryview(self._mmap)

    def close(self) -> None:
        """Unmap; raises BufferError while a tensor view still uses the mapping."""
        self.buf.release()
        self._mmap.close()


class ShmAttachments:
    """The receiver's mappings of its senders' slabs, by segment name. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_sender: dict[str, list[_Mapping]] = {}
        self._by_name: dict[str, _Mapping] = {}

    def attach(self, sender_id: str, names: list[str], segment_bytes: int) -> None:
        mappings: list[_Mapping] = []
        try:
            for name in names:
                mappings.append(_Mapping(name))
                if mappings[-1].size < segment_bytes:
                    raise ValueError(f"shared-memory segment {name} is {mappings[-1].size} bytes, "
                                     f"expected at least {segment_bytes}")
        except BaseException:
            for mapping in mappings:
                mapping.close()
            raise
        self.detach(sender_id)  # a sender that reconnects replaces its old slabs
        with self._lock:
            self._by_sender[sender_id] = mappings
            self._by_name.update((mapping.name, mapping) for mapping in mappings)

    def view(self, name: str, offset: int, num_bytes: int) -> torch.Tensor:
        """[num_bytes] uint8 over an attached segment; KeyError if unknown, ValueError if out of range."""
        with self._lock:
            mapping = self._by_name[name]
        if offset < 0 or offset + num_bytes > mapping.size:
            raise ValueError(f"shm range [{offset}, {offset + num_bytes}) outside segment {name} "
                             f"of {mapping.size} bytes")
        return torch.frombuffer(mapping.buf, dtype=torch.uint8, count=num_bytes, offset=offset)

    def detach(self, sender_id: str) -> None:
        with self._lock:
            mappings = self._by_sender.pop(sender_id, [])
            for mapping in mappings:
                self._by_name.pop(mapping.name, None)
        for mapping in mappings:
            try:
                mapping.close()
            except BufferError:
                pass  # a copy still reads it: the mapping goes with its last view

    def close(self) -> None:
        with self._lock:
            sender_ids = list(self._by_sender)
        for sender_id in sender_ids:
            self.detach(sender_id)
