"""The receiver's side of one-sided writes: which senders may write into its shared pool, their
processes, and the control slots of the reservations they write.

A sender is admitted at its handshake if its process can be watched: the receiver opens a pidfd on
the pid the sender gave (same pid namespace only), so "the writer is gone" is a fact the kernel
states, immune to pid reuse. Each one-sided reservation takes a slot in the pool's control area:

    open_slot   tickets[slot] = ticket (unique, never 0)   the writer may write while it reads this
    close_slot  tickets[slot] = 0                           the writer stops before its next chunk
    free_slot   the slot may serve another reservation      only once the writer confirmed or exited
"""
from __future__ import annotations

import itertools
import logging
import os
import select
import threading
from dataclasses import dataclass

from kvcache.shared_pool import SharedKVPool
from kvcache.transfer._proto import kv_transfer_pb2 as pb

logger = logging.getLogger(__name__)


def pid_namespace() -> str:
    """This process's pid namespace, e.g. 'pid:[4026531836]' ('' when it cannot be read)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@dataclass
class WriterProcess:
    sender_id: str
    pid: int
    pidfd: int

    def exited(self) -> bool:
        """True once every thread of the process has exited (its mappings are gone). Never blocks.
        Only while admitted (the pidfd is closed by OneSidedWriters.forget, under its lock)."""
        readable, _, _ = select.select([self.pidfd], [], [], 0)
        return bool(readable)


class OneSidedWriters:
    """Thread-safe."""

    def __init__(self, pool: SharedKVPool) -> None:
        self.pool = pool
        self._lock = threading.Lock()
        self._writers: dict[str, WriterProcess] = {}
        self._free_slots = list(range(pool.num_slots))[::-1]
        self._tickets = itertools.count(1)
        self._pid_namespace = pid_namespace()

    # ---- writers ----
    def admit(self, sender_id: str, pid: int, namespace: str) -> str:
        """Watch the sender's process; returns '' when admitted, else why not."""
        if not self._pid_namespace or namespace != self._pid_namespace:
            return f"another pid namespace ({namespace or 'unknown'}, this one is {self._pid_namespace or 'unknown'})"
        if pid <= 0:
            return "no pid"
        with self._lock:
            if sender_id in self._writers:
                return "" if self._writers[sender_id].pid == pid else "sender id already used by another process"
        try:
            pidfd = os.pidfd_open(pid)
        except (OSError, AttributeError) as e:
            return f"cannot watch process {pid}: {e}"
        writer = WriterProcess(sender_id, pid, pidfd)
        if writer.exited():
            os.close(pidfd)
            return f"process {pid} has exited"
        with self._lock:
            self._writers[sender_id] = writer
        return ""

    def get(self, sender_id: str) -> WriterProcess | None:
        with self._lock:
            return self._writers.get(sender_id)

    def exited(self) -> list[WriterProcess]:
        """Admitted writers whose process has exited (still admitted until forget())."""
        with self._lock:  # the pidfds stay open while checked
            return [w for w in self._writers.values() if w.exited()]

    def forget(self, sender_id: str) -> bool:
        """Stop watching the writer; False if it was not admitted (or forgotten already)."""
        with self._lock:
            writer = self._writers.pop(sender_id, None)
            if writer is None:
                return False
            os.close(writer.pidfd)
        return True

    # ---- slots ----
    def open_slot(self) -> tuple[int, int] | None:
        """(slot, ticket) with tickets[slot] = ticket and progress[slot] = 0; None when none is free."""
        with self._lock:
            if not self._free_slots:
                return None
            slot, ticket = self._free_slots.pop(), next(self._tickets)
        self.pool.progress[slot] = 0  # its last writer confirmed it stopped (or exited) before free_slot
        self.pool.tickets[slot] = ticket
        return slot, ticket

    def close_slot(self, slot: int) -> None:
        """The reservation is over: writers stop before their next chunk (the slot stays taken)."""
        self.pool.tickets[slot] = 0

    def free_slot(self, slot: int) -> None:
        """Assumes no writer of the slot's reservation writes any more."""
        self.pool.tickets[slot] = 0
        with self._lock:
            self._free_slots.append(slot)

    def progress(self, slot: int) -> int:
        return self.pool.progress[slot]

    def pool_message(self) -> pb.SharedPool:
        """What a sender maps; with a GPU pool, a CUDA IPC handle of its own (RuntimeError where the
        driver will not export it)."""
        regions = self.pool.regions
        message = pb.SharedPool(name=self.pool.name, kv_bytes=self.pool.kv_bytes, num_blocks=self.pool.num_blocks,
                                tickets_offset=regions.tickets_offset, progress_offset=regions.progress_offset,
                                num_slots=regions.num_slots, control_bytes=regions.control_bytes)
        if self.pool.tensor.is_cuda:
            from kvcache import cuda_ipc
            message.cuda.CopyFrom(cuda_ipc.export(self.pool.tensor))
        return message

    def close(self) -> None:
        with self._lock:
            sender_ids = list(self._writers)
        for sender_id in sender_ids:
            self.forget(sender_id)
        self.pool.close()
