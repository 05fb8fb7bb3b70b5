"""The engine process: builds the Engine (the model loads here) and runs its step loop.

    python -m serving.engine.engine_core_proc        started by EngineProcess, never by hand

Its start document (config, role, the deployment's token, socket addresses, CPU placement) is one
JSON line on stdin, so nothing secret is on the command line. The parent keeps stdin open for the
child's whole life: end of file on it means the parent is gone, and the process exits at once.

Threads, as in vLLM's EngineCoreProc:

    input thread   PULL socket -> decode -> inbox; CANCEL marks a queued call to be skipped
    main thread    the busy loop: run what is in the inbox (add, abort, call), step while there is
                   work, send each step's outputs as one OUTPUTS message; block on the inbox when idle
    zmq I/O thread writes the sockets: a send only queues bytes, it never waits for the parent
    parent watch   end of file on stdin -> exit

A bug in the loop's own bookkeeping sends DEAD with a message for the client and waits for the
parent to end the process (so the reason always arrives before the exit is noticed).
"""
from __future__ import annotations

import gc
import json
import logging
import os
import pickle
import queue
import sys
import threading
import time

import zmq

from scheduler.request import RequestStatus
from serving.engine import core_messages as m
from serving.engine.cpu_placement import (CpuPlacement, leave_stop_signals_to_parent, name_os_thread,
                                          place_engine_threads)
from serving.runner.cpu_threads import move_other_threads

logger = logging.getLogger(__name__)

_MOVES_POLL_S = 0.002  # only KV moves in flight: poll gently
_STATS_INTERVAL_S = 0.5  # stats ride on outputs at most this often (and whenever the engine goes idle)
_LINGER_MS = 5000


class CoreLoop:
    def __init__(self, engine, input_socket: zmq.Socket, output_socket: zmq.Socket) -> None:
        self.engine = engine
        self.input = input_socket
        self.output = output_socket
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled: set[int] = set()  # calls whose caller gave up before they ran
        self.num_cancelled_calls = 0
        self.stopping = False
        self._last_stats = 0.0
        threading.Thread(target=self._read_input, name="pdserve-engine-input", daemon=True).start()

    # ---- input thread ----
    def _read_input(self) -> None:
        name_os_thread("pdserve-eng-in")
        while True:
            message = m.unpack(self.input.recv(copy=False).buffer)
            if message[0] == m.CANCEL:
                self.cancelled.add(message[1])
                continue
            self.inbox.put(message)
            if message[0] == m.SHUTDOWN:
                return

    # ---- main thread ----
    def run(self) -> None:
        engine = self.engine
        while not self.stopping:
            if engine.has_unfinished():
                self._drain_inbox(timeout_s=0.0)
                if self.stopping:
                    return
                outputs = engine.step()
                self._send_outputs(outputs)
                if engine.last_step_idle:
                    self._drain_inbox(timeout_s=_MOVES_POLL_S)
            else:
                self._drain_inbox(timeout_s=None)  # idle: sleep until a message comes

    def _drain_inbox(self, timeout_s: float | None) -> None:
        """Handle every queued message; wait up to timeout_s (None: for ever) for the first."""
        try:
            message = self.inbox.get(timeout=timeout_s) if timeout_s != 0.0 else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(message)
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, message: list) -> None:
        kind = message[0]
        if kind == m.ADD:
            _, request_id, prompt_token_ids, params, kwargs = message
            try:
                self.engine.add_request(request_id, prompt_token_ids, m.decode_params(params), **kwargs)
            except Exception as e:  # the request's error (e.g. rejected), handed back to its stream
                self.output.send(m.pack([m.ADD_FAILED, request_id, m.dump_exception(e)]))
        elif kind == m.ABORT:
            _, call_id, request_ids, status, stop_reason = message
            self._send_outputs(self.engine.abort_requests(request_ids, RequestStatus(status), stop_reason))
            if call_id is not None:
                self._reply(call_id, True, m.dump_result(None))
        elif kind == m.CALL:
            self._run_call(message[1], message[2])
        elif kind == m.SHUTDOWN:
            self.stopping = True

    def _run_call(self, call_id: int, data: bytes) -> None:
        if call_id in self.cancelled:  # its caller is gone (e.g. a client that disconnected)
            self.cancelled.discard(call_id)
            self.num_cancelled_calls += 1
            return
        try:
            result = m.dump_result(pickle.loads(data)(self.engine))
        except Exception as e:  # the caller's error, handed back to it; the loop goes on
            self._reply(call_id, False, m.dump_exception(e))
            return
        self._reply(call_id, True, result)

    def _reply(self, call_id: int, ok: bool, payload: bytes) -> None:
        self.output.send(m.pack([m.REPLY, call_id, ok, payload]))

    def _send_outputs(self, outputs: list) -> None:
        now = time.monotonic()
        idle = not self.engine.has_unfinished()
        stats = None
        if idle or now - self._last_stats >= _STATS_INTERVAL_S:
            stats, self._last_stats = self.engine.get_stats(), now
        if outputs or stats is not None:
            self.output.send(m.outputs_message(outputs, stats), copy=False)


def _watch_parent(fd: int) -> None:
    """End of file on stdin: the parent is gone (or is stopping us); nobody is left to serve. Reads
    the raw descriptor: the buffered sys.stdin would hold a lock at interpreter shutdown."""
    while os.read(fd, 4096):
        pass
    os._exit(0)


def _serve(start: dict, context: zmq.Context, pinning=None) -> int:
    from serving.config import Config
    from serving.engine.engine import build_engine

    output = context.socket(zmq.PUSH)
    output.setsockopt(zmq.SNDHWM, 0)  # never drop or block: the parent reads as fast as steps come
    output.setsockopt(zmq.LINGER, _LINGER_MS)
    output.connect(start["output_address"])
    input_socket = context.socket(zmq.PULL)
    input_socket.setsockopt(zmq.RCVHWM, 0)
    input_socket.bind(start["input_address"])
    try:
        engine = build_engine(Config.from_dict(start["config"]), start["role"], token=start["token"])
    except BaseException as e:  # what the parent raises in turn (a ValueError: pdserve prints it)
        logger.debug("engine start failed", exc_info=True)
        output.send(m.pack([m.STARTUP_ERROR, m.dump_exception(e), str(e)]))
        output.close()
        return 1
    try:
        freeze_gc_heap()
        info = m.EngineInfo.of(engine, os.getpid())
        output.send(m.pack([m.READY, info.to_list()]))
        loop = CoreLoop(engine, input_socket, output)
        if pinning is not None:  # zmq's and the input thread were born on a compute core
            move_other_threads(pinning)
        try:
            loop.run()
        except BaseException as e:  # a bug in the engine's own bookkeeping: fail everything loudly
            logger.exception("engine loop died")
            reason = (f"the engine stopped after an internal error ({type(e).__name__}) and serves no "
                      "more requests until it is restarted")
            output.send(m.pack([m.DEAD, reason]))
            threading.Event().wait()  # the parent ends this process once it has read the reason
        return 0
    finally:
        engine.close()
        output.close()
        input_socket.close(linger=0)


def freeze_gc_heap() -> None:
    """Collect once, then put every object alive now (modules, the libraries imported with them: ~300K
    objects with the small model) out of the cyclic garbage collector's reach. A full collection over
    them took 158 ms on the 2-core CPU box, a stall of eight decode steps whenever the collector chose
    to run one while serving; after this it takes ~0 ms. vLLM's engine core does the same after its
    startup (vllm.utils.gc_utils.freeze_gc_heap). Objects made later are collected as usual. Only this
    process, which lives as long as its engine, does it: in a user's process (the offline LLM) a frozen
    cycle would never be freed."""
    gc.collect()
    gc.freeze()


def _read_line(fd: int) -> bytes:
    """The start document: one line, and the parent writes nothing after it."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            raise SystemExit("engine process: no start document on stdin")
        data += chunk
    return data


def main() -> int:
    leave_stop_signals_to_parent()  # Ctrl-C or a group's SIGTERM drains the parent, which stops us when done
    name_os_thread("pdserve-engine")  # the main thread runs the loop; `ps` and `top` show this name
    start = json.loads(_read_line(0))
    pinning = place_engine_threads(CpuPlacement(tuple(start["cores"]) if start["cores"] else None,
                                                start["num_threads"], bool(start.get("pin"))))
    logging.basicConfig(level=start["log_level"].upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [engine {os.getpid()}] %(name)s: %(message)s")
    threading.Thread(target=_watch_parent, args=(0,), name="pdserve-parent-watch", daemon=True).start()
    context = zmq.Context(io_threads=1)
    try:
        return _serve(start, context, pinning)
    finally:
        context.term()


if __name__ == "__main__":
    sys.exit(main())
