"""EngineProcess: the engine core in a process of its own, behind EngineThread's asyncio interface.

    API / instance process                              engine process (engine_core_proc.py)
    generate / abort / call ─ msgpack over zmq ipc ──►  input thread ─► busy loop: schedule, compute
    receiver thread ◄──────── one OUTPUTS per step ───  (the model, KV cache and scheduler live here)
        └─ per-request asyncio queues (one loop wake-up per step)

The API process keeps HTTP, tokenization and detokenization; the engine process schedules and
computes, with the cores to itself (cpu_placement.py) and no GIL shared with the server. What
crosses is requests in and EngineCoreOutputs out (core_messages.py); StepPlan/StepResult never leave
the engine process. `call(fn)` ships fn(engine) with cloudpickle, for tests and admin.

Failure (core_connection.py): a child that dies (kill -9, OOM, a crash) is seen at once through a
pidfd; every request in flight ends with EngineDeadError naming the pid and the signal or exit
code, pending calls fail the same way, and is_healthy() turns False. With restart=True (AsyncLLM) a
fresh engine process is started; an instance does not restart (its Health says unhealthy and the
router replaces the instance). A bug inside the engine loop arrives as DEAD with its message first,
and the parent then ends the child. Nothing waits on a timeout to find out.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable

from scheduler.engine_core import EngineCoreOutput
from scheduler.request import RequestStatus
from scheduler.sampling_params import SamplingParams
from serving.config import Config
from serving.engine import core_messages as m
from serving.engine.core_connection import CoreConnection
from serving.engine.cpu_placement import CpuPlacement, engine_placement
from serving.engine.protocol import EngineDeadError, EngineStats

logger = logging.getLogger(__name__)

_RESTART_NOTE = "; it is being restarted: retry shortly"


def _engine_stats(engine) -> EngineStats:
    return engine.get_stats()


class EngineProcess:
    """An Engine in a child process, driven like an EngineThread: generate, abort, call, post,
    is_healthy, dead_reason, shutdown (plus info, get_stats, pid).

    restart: start a fresh engine process when this one dies (colocated serving). Requests that
    arrive while it restarts fail at once with EngineDeadError (a 503 that says to retry), as does
    /health: they never wait for a model load. A restart that fails leaves the engine dead."""

    def __init__(self, config: Config, role: str = "colocated", token: str | None = None,
                 placement: CpuPlacement | None = None, restart: bool = False) -> None:
        self.config = config
        self.role = role
        self._token = token
        self.placement = placement or engine_placement()
        self._restart = restart
        self._lock = threading.Lock()
        self._stopping = False
        self._restart_error: str | None = None
        self.num_restarts = 0
        self._conn = self._start()

    def _start(self) -> CoreConnection:
        start = {"config": self.config.to_dict(), "role": self.role, "token": self._token,
                 "cores": list(self.placement.cores) if self.placement.cores else None,
                 "num_threads": self.placement.num_threads, "pin": self.placement.pin, "log_level": self.config.server.log_level}
        return CoreConnection(start, self.config.deploy.instance_start_timeout_s, self._exited,
                              _RESTART_NOTE if self._restart else "")

    # ---- what the API needs to know ----
    @property
    def info(self) -> m.EngineInfo:
        return self._conn.info

    @property
    def pid(self) -> int:
        return self._conn.pid

    def get_stats(self) -> EngineStats:
        """As of the last step that carried them (at most ~0.5 s old; exact once the engine is idle), with
        how many times this process restarted the engine (pdserve:engine_restarts_total: a dead engine
        process, or a tensor-parallel rank that took it down)."""
        stats = self._conn.stats
        return dataclasses.replace(stats, extra={**(stats.extra or {}), "engine": {"restarts_total": self.num_restarts}})

    async def refresh_stats(self) -> None:
        self._conn.stats = await self.call(_engine_stats)

    @property
    def num_cancelled_calls(self) -> int:
        return self._conn.num_cancelled_calls

    # ---- EngineThread's interface ----
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       **request_kwargs) -> AsyncIterator[EngineCoreOutput]:
        """Submit a request (kwargs: client_id, priority, kv_peer, remote_prefill) and iterate its
        outputs until the finished one. Closing the iterator early aborts the request."""
        conn = self._live()
        stream: asyncio.Queue = asyncio.Queue()
        conn.open_stream(request_id, asyncio.get_running_loop(), stream)
        finished = False
        try:
            conn.send(m.add_message(request_id, prompt_token_ids, params, request_kwargs))
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                for output in item:
                    finished = output.finished
                    yield output
        finally:
            conn.close_stream(request_id)
            if not finished and conn.dead_reason is None:  # client gone: free its blocks
                try:
                    conn.send(m.abort_message(None, [request_id], RequestStatus.FINISHED_ABORTED, None))
                except EngineDeadError:
                    pass

    async def abort(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED,
                    stop_reason: int | str | None = None) -> None:
        future = self._live().call(lambda call_id: m.abort_message(call_id, [request_id], status, stop_reason))
        await asyncio.wrap_future(future)

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run fn(engine) in the engine process between steps; fn and its result are pickled."""
        return await asyncio.wrap_future(self.post(fn))

    def post(self, fn: Callable[[Any], Any]) -> Future:
        """Like call(), from any thread, without waiting."""
        conn = self._conn
        if conn.dead_reason is not None:
            future: Future = Future()
            future.set_exception(EngineDeadError(self.dead_reason))
            return future
        return conn.call(lambda call_id: m.call_message(call_id, fn))

    def is_healthy(self) -> bool:
        return self._conn.dead_reason is None and not self._stopping

    @property
    def dead_reason(self) -> str | None:
        reason = self._conn.dead_reason
        if reason is None:
            return None
        if self._restart_error is not None:
            return self._restart_error
        return reason

    async def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            conn = self._conn
        await asyncio.get_running_loop().run_in_executor(None, conn.shutdown)

    # ---- death and restart ----
    def _live(self) -> CoreConnection:
        conn = self._conn
        if conn.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        return conn

    def _exited(self, conn: CoreConnection) -> None:
        """Receiver thread of a process that has exited (its requests have already failed)."""
        if conn.stopping or self._stopping or conn is not self._conn:
            return
        logger.error("%s", conn.dead_reason)
        if self._restart:
            self._restart_now(conn)

    def _restart_now(self, dead: CoreConnection) -> None:
        logger.info("restarting the engine process")
        try:
            conn = self._start()
        except Exception as e:  # noqa: BLE001 - it stays dead, and says why
            logger.exception("restarting the engine process failed")
            reason = (dead.dead_reason or "").removesuffix(_RESTART_NOTE)
            self._restart_error = f"{reason}, and restarting it failed ({e})"
            return
        with self._lock:
            if not self._stopping:
                self._conn = conn
                self.num_restarts += 1
                logger.info("engine process restarted (pid %d)", conn.pid)
                return
        conn.shutdown()  # shut down while it was starting
