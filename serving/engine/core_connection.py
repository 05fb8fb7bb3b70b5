"""The API side of one engine process: start it, talk to it, notice at once when it dies.

`CoreConnection` owns one child (engine_core_proc.py) from start to exit: it writes the start
document to the child's stdin (and keeps stdin open: its end of file tells the child that we are
gone), waits for READY or STARTUP_ERROR, then a receiver thread polls two things together:

    the output socket   OUTPUTS -> per-request asyncio queues, one loop wake-up per step;
                        REPLY -> the caller's future; ADD_FAILED -> the request's stream; DEAD
    a pidfd of the child  readable the moment it exits (kill -9, OOM, crash): every stream and
                        pending call fails with EngineDeadError naming the pid and the signal

so a dead engine is a clear error within the time the kernel takes to reap it, never a timeout.
EngineProcess (engine_process.py) holds the current connection and replaces it on a restart.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future, InvalidStateError
from typing import Callable

import zmq

from scheduler.engine_core import EngineCoreOutput
from serving.engine import core_messages as m
from serving.engine.cpu_placement import engine_environment
from serving.engine.protocol import EngineDeadError, EngineStats

logger = logging.getLogger(__name__)

_STOP_GRACE_S = 10.0


def describe_exit(pid: int, returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            how = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"killed by signal {-returncode}"
    else:
        how = f"exit code {returncode}"
    return f"the engine process (pid {pid}) died ({how})"


class CoreConnection:
    """One engine process and its two sockets, from start until it exits. Thread-safe: sends are
    serialized by a lock; streams and pending calls are registered under a lock that failing
    also takes, so nothing registered can miss the failure."""

    def __init__(self, start: dict, start_timeout_s: float, on_exit: Callable[["CoreConnection"], None],
                 death_note: str = "") -> None:
        self._dir = tempfile.mkdtemp(prefix="pdserve-engine-")  # 0700: no other user can connect
        self.context = zmq.Context(io_threads=1)
        self.output = self.context.socket(zmq.PULL)
        self.output.setsockopt(zmq.RCVHWM, 0)
        self.output.bind(f"ipc://{self._dir}/out")
        self.input = self.context.socket(zmq.PUSH)  # connects now; messages queue until the child binds
        self.input.setsockopt(zmq.SNDHWM, 0)
        self.input.setsockopt(zmq.LINGER, 0)
        self.input.connect(f"ipc://{self._dir}/in")
        self.proc = subprocess.Popen([sys.executable, "-m", "serving.engine.engine_core_proc"],
                                     stdin=subprocess.PIPE, stdout=2,  # its stdout is not ours to use
                                     env=engine_environment())
        self.pid = self.proc.pid
        self.pidfd = os.pidfd_open(self.pid)
        self.streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.pending: dict[int, Future] = {}
        self.dead_reason: str | None = None
        self.stopping = False
        self.num_cancelled_calls = 0
        self.stats = EngineStats()
        self._on_exit = on_exit
        self._death_note = death_note  # appended to why it died (e.g. that it is being restarted)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._call_ids = itertools.count()
        try:
            self.proc.stdin.write(json.dumps({**start, "input_address": f"ipc://{self._dir}/in",
                                              "output_address": f"ipc://{self._dir}/out"}).encode() + b"\n")
            self.proc.stdin.flush()  # and it stays open: its end of file tells the child we are gone
            self.info = self._wait_ready(start_timeout_s)
        except BaseException:
            self.close(kill=True)
            raise
        threading.Thread(target=self._receive, name=f"pdserve-engine-{self.pid}-out", daemon=True).start()

    # ---- start ----
    def _wait_ready(self, timeout_s: float) -> m.EngineInfo:
        poller = zmq.Poller()
        poller.register(self.output, zmq.POLLIN)
        poller.register(self.pidfd, zmq.POLLIN)
        if not poller.poll(timeout_s * 1000):
            raise RuntimeError(f"the engine process (pid {self.pid}) did not start within {timeout_s:g}s")
        if self.output.poll(0):
            message = m.unpack(self.output.recv())
            if message[0] == m.READY:
                return m.EngineInfo.from_list(message[1])
            if message[0] == m.STARTUP_ERROR:
                error = m.load_exception(message[1])
                if isinstance(error, ValueError):  # a configuration error: `pdserve serve` prints it
                    raise error
                raise RuntimeError(f"the engine failed to start: {message[2]}") from error
        self.proc.wait()
        raise RuntimeError(f"{describe_exit(self.pid, self.proc.returncode)} before it was ready; its log "
                           "is above")

    # ---- asyncio side (and any thread, for post) ----
    def open_stream(self, request_id: str, loop: asyncio.AbstractEventLoop, stream: asyncio.Queue) -> None:
        with self._lock:
            if self.dead_reason is not None:
                raise EngineDeadError(self.dead_reason)
            self.streams[request_id] = (loop, stream)

    def close_stream(self, request_id: str) -> None:
        self.streams.pop(request_id, None)

    def send(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self.input.send(data, copy=False)
            except zmq.ZMQError as e:  # the sockets are closed: the process has gone
                raise EngineDeadError(self.dead_reason or f"the engine process (pid {self.pid}) is gone") from e

    def call(self, make_message: Callable[[int], bytes]) -> Future:
        """A request with a reply (a call, an awaited abort): the future gets the result or error."""
        future: Future = Future()
        call_id = next(self._call_ids)
        with self._lock:
            if self.dead_reason is not None:
                future.set_exception(EngineDeadError(self.dead_reason))
                return future
            self.pending[call_id] = future
        try:
            self.send(make_message(call_id))
        except Exception as e:  # e.g. a function cloudpickle cannot serialize
            self.pending.pop(call_id, None)
            future.set_exception(e)
            return future
        future.add_done_callback(lambda f: self._cancelled(call_id) if f.cancelled() else None)
        return future

    def _cancelled(self, call_id: int) -> None:
        """Its caller gave up (a client that went away): the child skips it if it has not begun."""
        if self.pending.pop(call_id, None) is not None and self.dead_reason is None:
            self.num_cancelled_calls += 1
            try:
                self.send(m.pack([m.CANCEL, call_id]))
            except EngineDeadError:
                pass

    # ---- receiver thread ----
    def _receive(self) -> None:
        poller = zmq.Poller()
        poller.register(self.output, zmq.POLLIN)
        poller.register(self.pidfd, zmq.POLLIN)
        while True:
            events = dict(poller.poll())
            self._read_all()
            if self.pidfd in events:
                self.proc.wait()
                self._read_all()  # whatever it sent before it went
                if self.stopping:
                    self.fail("the engine was shut down")
                else:
                    self.fail(describe_exit(self.pid, self.proc.returncode) + self._death_note)
                self.close()
                self._on_exit(self)
                return

    def _read_all(self) -> None:
        while self.output.poll(0):
            self._handle(m.unpack(self.output.recv(copy=False).buffer))

    def _handle(self, message: list) -> None:
        kind = message[0]
        if kind == m.OUTPUTS:
            if message[2] is not None:
                self.stats = m.decode_stats(message[2])
            self._deliver([m.decode_output(values) for values in message[1]])
        elif kind == m.REPLY:
            _, call_id, ok, payload = message
            future = self.pending.pop(call_id, None)
            if future is None:
                return
            try:
                if ok:
                    future.set_result(m.pickle.loads(payload))
                else:
                    future.set_exception(m.load_exception(payload))
            except InvalidStateError:  # cancelled meanwhile: nobody wants it
                pass
        elif kind == m.ADD_FAILED:
            target = self.streams.get(message[1])
            if target is not None:
                _post_to_loop(target[0], target[1].put_nowait, m.load_exception(message[2]))
        elif kind == m.DEAD:
            logger.error("engine process %d: %s", self.pid, message[1])
            self.fail(message[1] + self._death_note)
            self.proc.kill()

    def _deliver(self, outputs: list[EngineCoreOutput]) -> None:
        """One wake-up per event loop per step, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, dict[str, tuple[asyncio.Queue, list]]] = {}
        for output in outputs:
            target = self.streams.get(output.request_id)
            if target is not None:
                loop, stream = target
                by_loop.setdefault(loop, {}).setdefault(output.request_id, (stream, []))[1].append(output)
        for loop, batches in by_loop.items():
            _post_to_loop(loop, _put_batches, batches)

    def fail(self, reason: str) -> None:
        """Every stream and pending call ends with EngineDeadError(reason); later ones fail at once."""
        with self._lock:
            if self.dead_reason is not None:
                return
            self.dead_reason = reason
            streams, self.streams = list(self.streams.values()), {}
            pending, self.pending = list(self.pending.values()), {}
        error = EngineDeadError(reason)
        for loop, stream in streams:
            _post_to_loop(loop, stream.put_nowait, error)
        for future in pending:
            try:
                future.set_exception(error)
            except InvalidStateError:
                pass

    # ---- stop ----
    def shutdown(self, grace_s: float = _STOP_GRACE_S) -> None:
        """Blocking: ask the child to stop, wait for it (the receiver thread then cleans up)."""
        self.stopping = True
        if self.proc.poll() is None:
            self.send(m.pack([m.SHUTDOWN]))
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("engine process %d did not stop within %gs; killing it", self.pid, grace_s)
                self.proc.kill()
                self.proc.wait()

    def close(self, kill: bool = False) -> None:
        if kill and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        with self._send_lock:  # a socket is one thread's at a time: no send races its closing
            for closeable in (self.proc.stdin, self.input, self.output):
                try:
                    closeable.close()
                except Exception:  # noqa: BLE001 - closing what may be half-open already
                    pass
        os.close(self.pidfd)
        self.context.term()
        shutil.rmtree(self._dir, ignore_errors=True)


def _post_to_loop(loop: asyncio.AbstractEventLoop, fn: Callable, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that event loop is closed: nobody is listening
        pass


def _put_batches(batches: dict[str, tuple[asyncio.Queue, list]]) -> None:
    for stream, items in batches.values():
        stream.put_nowait(items)
