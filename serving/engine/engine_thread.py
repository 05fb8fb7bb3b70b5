"""EngineThread: an Engine stepped on a background thread, with one asyncio queue per request carrying
its EngineCoreOutputs (token ids) back to the event loop.

All engine mutation happens on the engine thread: the event loop only posts calls (add, abort, any
function of the engine) to an inbox, so the scheduler and KV manager need no locks. Torch releases
the GIL inside its kernels, so the event loop stays responsive while a step runs.

A posted call belongs to its caller alone: a caller that gave up (a client that disconnected
cancels the future) has its call skipped; a call that raises hands the error back to its caller.
Neither ever stops the loop. Only an error inside a step's own bookkeeping does, and then every
request fails with EngineDeadError and the server stays up to say so.
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable

from scheduler.engine_core import EngineCoreOutput
from scheduler.request import RequestStatus
from scheduler.sampling_params import SamplingParams
from serving.engine.core_messages import EngineInfo
from serving.engine.cpu_placement import name_os_thread
from serving.engine.engine import Engine
from serving.engine.protocol import EngineDeadError, EngineStats

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05
_MOVES_POLL_S = 0.002


class EngineThread:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._dead: str | None = None
        self._stopping = False
        self.num_cancelled_calls = 0  # posted calls skipped because their caller had gone
        self._thread = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)
        self._thread.start()

    # ---- what the API needs to know (EngineProcess has the same) ----
    @property
    def info(self) -> EngineInfo:
        return EngineInfo.of(self.engine, os.getpid())

    @property
    def pid(self) -> int:
        return os.getpid()

    def get_stats(self) -> EngineStats:
        return self.engine.get_stats()  # plain reads of ints: fine to race the engine thread

    async def refresh_stats(self) -> None:
        """Stats are read live: nothing to refresh."""

    # ---- event loop side ----
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       **request_kwargs) -> AsyncIterator[EngineCoreOutput]:
        """Submit a request (kwargs: client_id, priority, kv_peer, remote_prefill) and iterate its
        outputs until the finished one. Closing the iterator early aborts the request."""
        if self._dead:
            raise EngineDeadError(self._dead)
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, stream)
        finished = False
        try:
            await asyncio.wrap_future(self._post(
                lambda: self.engine.add_request(request_id, prompt_token_ids, params, **request_kwargs)))
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                for output in item:
                    finished = output.finished
                    yield output
        finally:
            self._streams.pop(request_id, None)
            if not finished and not self._dead:
                self._post(self._abort, [request_id])  # client gone: free its blocks

    async def abort(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED,
                    stop_reason: int | str | None = None) -> None:
        await asyncio.wrap_future(self._post(self._abort, [request_id], status, stop_reason))

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run fn(engine) on the engine thread between steps."""
        return await asyncio.wrap_future(self._post(fn, self.engine))

    def post(self, fn: Callable[[Engine], Any]) -> Future:
        """Like call(), from any thread, without waiting."""
        return self._post(fn, self.engine)

    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    @property
    def dead_reason(self) -> str | None:
        return self._dead

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)

    # ---- engine thread ----
    def _post(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        if self._dead:
            future.set_exception(EngineDeadError(self._dead))
            return future
        self._inbox.put((fn, args, future))
        self._wake.set()
        return future

    def _run(self) -> None:
        name_os_thread("pdserve-engine")
        try:
            while not self._stopping:
                self._drain_inbox()
                if self.engine.has_unfinished():
                    self._deliver(self.engine.step())
                    if self.engine.last_step_idle:  # only KV moves in flight: poll gently
                        self._wake.wait(_MOVES_POLL_S)
                        self._wake.clear()
                else:
                    self._wake.wait(_IDLE_WAIT_S)
                    self._wake.clear()
        except BaseException as e:  # a bug in the engine's own bookkeeping: fail everything loudly
            logger.exception("engine loop died")
            # what the client is told (the details are in the log above): retrying here cannot help
            self._dead = (f"the engine stopped after an internal error ({type(e).__name__}) and serves no "
                          "more requests until it is restarted")
            self._fail_all(EngineDeadError(self._dead))

    def _drain_inbox(self) -> None:
        while True:
            try:
                fn, args, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._run_call(fn, args, future)

    def _run_call(self, fn: Callable, args: tuple, future: Future) -> None:
        """Run one posted call. A call whose caller already gave up (its future was cancelled: the
        client went away) is skipped; once it runs, the caller can no longer cancel it, so completing
        the future cannot fail."""
        if not future.set_running_or_notify_cancel():
            self.num_cancelled_calls += 1
            return
        try:
            result = fn(*args)
        except Exception as e:  # the caller's error (e.g. a rejected request), handed back to it
            future.set_exception(e)
            return
        future.set_result(result)

    def _abort(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED,
               stop_reason: int | str | None = None) -> None:
        """Engine thread: abort and tell any listener that its request ended."""
        self._deliver(self.engine.abort_requests(request_ids, status, stop_reason))

    def _deliver(self, outputs: list[EngineCoreOutput]) -> None:
        by_stream: dict[str, list[EngineCoreOutput]] = {}
        for output in outputs:
            by_stream.setdefault(output.request_id, []).append(output)
        for request_id, items in by_stream.items():
            target = self._streams.get(request_id)
            if target is not None:
                loop, stream = target
                try:
                    loop.call_soon_threadsafe(stream.put_nowait, items)
                except RuntimeError:  # that event loop is closed: nobody is listening
                    pass

    def _fail_all(self, error: BaseException) -> None:
        for loop, stream in list(self._streams.values()):
            try:
                loop.call_soon_threadsafe(stream.put_nowait, error)
            except RuntimeError:
                pass
        while True:
            try:
                _, _, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
