"""One API request as engine sub-requests: fan out, merge their outputs, abort what is left.

A request with P prompts and n choices becomes P*n engine sequences, choice index p*n + i
(prompt-major, then n), request id f"{response_id}-{index}". Each runs in a task of its own (a
"pump") that feeds one queue, so outputs reach the client in the order the engine produces them.

Aborts: whenever a `Generation` is closed with sub-requests unfinished (the client went away,
another sub-request failed, the server stops), their pumps are cancelled, which cancels the
engine's iterators, and each pump also calls `engine.abort(request_id)` so the KV blocks are freed
even if an engine relies on the explicit call. A watcher task reads the ASGI `receive` channel so
that a client that disconnects is noticed even while no output is being sent (a request waiting in
the queue).

Shutdown: a running Generation is registered with the app's `Drain`; when the drain deadline passes
the drain calls `end(error)`, which aborts like `close` and makes `next_output` raise the error
after the outputs already queued, so the client is told why its answer stops.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

from scheduler.sampling_params import SamplingParams
from serving.api.drain import Drain, expired_error
from serving.engine.protocol import EngineClient, EngineDeadError, RequestOutput
from serving.metrics import ServingMetrics

logger = logging.getLogger(__name__)

_INT64_MIN = -(2**63)
_DISCONNECTED = object()


class ClientDisconnected(Exception):
    """The client went away; every unfinished sub-request has been aborted."""


@dataclass(frozen=True)
class SubRequest:
    request_id: str
    choice_index: int
    prompt_token_ids: list[int]
    params: SamplingParams  # n == 1
    client_id: str = ""  # the OpenAI `user` field: fairness policies key on it
    priority: int = 0  # lower runs first under --scheduling-policy priority


def _offset_seed(seed: int | None, offset: int) -> int | None:
    """seed + offset, wrapped into int64 so a seed near the limit stays valid."""
    if seed is None:
        return None
    return (seed + offset - _INT64_MIN) % 2**64 + _INT64_MIN


def expand_sub_requests(response_id: str, prompts: list[tuple[list[int], SamplingParams]],
                        client_id: str = "", priority: int = 0) -> list[SubRequest]:
    """One sub-request per (prompt, choice). A seeded request gives choice i the seed seed+i:
    choices differ, the whole response is reproducible, and a prompt gets the same choices whether
    it is sent alone or in a batch of prompts."""
    subs = []
    for prompt_index, (prompt_token_ids, params) in enumerate(prompts):
        for i in range(params.n):
            index = prompt_index * params.n + i
            sub_params = params.clone(n=1, seed=_offset_seed(params.seed, i))
            subs.append(SubRequest(f"{response_id}-{index}", index, prompt_token_ids, sub_params, client_id,
                                   priority))
    return subs


class Generation:
    """Runs sub-requests concurrently; `next_output` yields their outputs as they come.

    Mutates the engine (submits on `start`, aborts on `close` and `end`) and `drain` (registers while
    running). `close` and `end` are idempotent, synchronous and safe to call from a cancelled task:
    the aborts run in the pump tasks, not in the caller.
    """

    def __init__(self, engine: EngineClient, sub_requests: list[SubRequest],
                 metrics: ServingMetrics, arrival_s: float, drain: Drain) -> None:
        self._engine = engine
        self._drain = drain
        self._sub_requests = sub_requests
        self._metrics = metrics
        self._arrival_s = arrival_s
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self._watcher: asyncio.Task | None = None
        self._num_open = len(sub_requests)
        self._closed = False

    def start(self, receive: Callable[[], Awaitable[dict]] | None) -> None:
        """Submit every sub-request; watch `receive` (ASGI, body already read) for a disconnect.
        Once the server's drain has expired, submits nothing and ends at once."""
        if self._drain.expired:
            self.end(expired_error())
            return
        self._drain.track(self)
        for sub in self._sub_requests:
            self._pumps.append(asyncio.create_task(self._pump(sub), name=sub.request_id))
        if receive is not None:
            self._watcher = asyncio.create_task(self._watch(receive))

    async def next_output(self) -> tuple[SubRequest, RequestOutput] | None:
        """The next output of any sub-request; None once all have finished.

        Raises what a sub-request's engine stream raised, or ClientDisconnected.
        """
        if self._num_open == 0:
            return None
        sub, item = await self._queue.get()
        if item is _DISCONNECTED:
            raise ClientDisconnected()
        if isinstance(item, BaseException):
            raise item
        if item.finished:
            self._num_open -= 1
        return sub, item

    def end(self, error: Exception) -> None:
        """Stop now (the server is shutting down): abort the unfinished sub-requests, as `close`
        does, and make `next_output` raise `error` once the outputs already queued are taken."""
        if self._closed:
            return
        self.close()
        self._queue.put_nowait((None, error))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drain.untrack(self)
        for pump in self._pumps:
            pump.cancel()  # a finished pump ignores this
        if self._watcher is not None and self._watcher is not asyncio.current_task():
            self._watcher.cancel()

    async def _pump(self, sub: SubRequest) -> None:
        tracker = self._metrics.track_request(self._arrival_s)
        finished = False
        stream = None
        try:
            stream = self._engine.generate(sub.request_id, sub.prompt_token_ids, sub.params,
                                           client_id=sub.client_id, priority=sub.priority)
            async for output in stream:
                tracker.on_output(output)
                self._queue.put_nowait((sub, output))
                if output.finished:
                    finished = True
                    break
            if not finished:
                raise RuntimeError(f"engine stream of {sub.request_id} ended before it finished")
        except asyncio.CancelledError:
            if not finished:
                tracker.on_abort()
                await self._abort(sub.request_id)
            raise
        except Exception as exc:  # handed to the consumer, which maps it to a status
            tracker.on_error()
            self._queue.put_nowait((sub, exc))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _abort(self, request_id: str) -> None:
        try:
            await self._engine.abort(request_id)
        except EngineDeadError:
            pass  # nothing left to free
        except Exception:
            logger.warning("aborting %s failed", request_id, exc_info=True)

    async def _watch(self, receive: Callable[[], Awaitable[dict]]) -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a broken channel is a gone client too
            logger.debug("receive failed while watching for a disconnect", exc_info=True)
        if self._closed:
            return  # the response completed; this disconnect is the normal end
        logger.info("client disconnected; aborting %d sub-request(s)", self._num_open)
        self.close()
        self._queue.put_nowait((None, _DISCONNECTED))
