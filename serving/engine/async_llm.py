"""AsyncLLM: the colocated EngineClient. An EngineCore stepped on a background thread, with one asyncio
queue per request carrying its outputs back to the event loop.

All engine mutation happens on the engine thread: the event loop only posts commands (add, abort,
call) to an inbox, so the scheduler and KV manager need no locks. Torch releases the GIL inside its
kernels, so the HTTP server stays responsive while a step runs.
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable

from scheduler.sampling_params import SamplingParams
from serving.config import Config
from serving.engine.core import EngineCore
from serving.engine.protocol import EngineDeadError, EngineStats, ModelInfo, RequestOutput

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05


class AsyncLLM:
    def __init__(self, core: EngineCore, served_model_name: str | None = None) -> None:
        self.core = core
        self.tokenizer = core.tokenizer
        self.model_info = ModelInfo(name=served_model_name or core.model_dir, path=core.model_dir,
                                    max_model_len=core.max_model_len, created=int(time.time()))
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._dead: str | None = None
        self._stopping = False
        self.num_cancelled_calls = 0  # posted calls skipped because their caller had gone
        self._thread = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: Config) -> "AsyncLLM":
        core = EngineCore(config)
        # like vLLM: the name is what --model said; the built-in model is called by its folder name
        name = config.model.served_model_name or config.model.model or os.path.basename(core.model_dir)
        return cls(core, name)

    # ---- EngineClient ----
    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, **request_kwargs) -> AsyncIterator[RequestOutput]:
        """request_kwargs go to EngineCore.add_request (kv_peer, remote_prefill, client_id)."""
        if self._dead:
            raise EngineDeadError(self._dead)
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, stream)
        finished = False
        try:
            await asyncio.wrap_future(self._post(
                lambda: self.core.add_request(request_id, prompt_token_ids, params, **request_kwargs)))
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

    async def abort(self, request_id: str) -> None:
        await asyncio.wrap_future(self._post(self._abort, [request_id]))

    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    def get_stats(self) -> EngineStats:
        return self.core.get_stats()  # plain reads of ints: fine to race the engine thread

    async def call(self, fn: Callable[[EngineCore], Any]) -> Any:
        """Run fn(core) on the engine thread between steps (tests, admin)."""
        return await asyncio.wrap_future(self._post(fn, self.core))

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
        try:
            while not self._stopping:
                self._drain_inbox()
                if self.core.has_unfinished():
                    self._deliver(self.core.step())
                    if self.core.last_step_idle:  # only waiting on KV transfers: poll gently
                        self._wake.wait(0.002)
                        self._wake.clear()
                else:
                    self._wake.wait(_IDLE_WAIT_S)
                    self._wake.clear()
        except BaseException as e:  # a bug in the engine: fail everything loudly, keep the server up
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
        the future cannot fail. Whatever goes wrong here belongs to this call alone: it is counted and
        logged, and the engine loop goes on."""
        if not future.set_running_or_notify_cancel():
            self.num_cancelled_calls += 1
            return
        try:
            result = fn(*args)
        except Exception as e:  # the caller's error (e.g. a rejected request), handed back to it
            future.set_exception(e)
            return
        future.set_result(result)

    def _abort(self, request_ids: list[str]) -> None:
        """Engine thread: abort and tell any listener that its request ended."""
        self._deliver(self.core.abort_requests(request_ids))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_stream: dict[str, list[RequestOutput]] = {}
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
