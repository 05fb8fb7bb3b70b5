"""One client request across a decode and a prefill instance (the order is in proto/instance.proto),
or on one colocated replica (data parallel: a leg is one Generate stream, `_replica_leg`).

A *leg* is one try: reserve KV blocks on a decode instance D, prefill on a prefill instance P that
sends the KV to D, hand P's first token to the client at once and to D, then stream D's tokens. The
prefill starts while D reserves when the router's estimate says D has room (scheduler/routing.py:
D answers only after a decode step; P's sender asks D again until D has registered the blocks); if D
refuses after all, that prefill is cancelled and P is asked again once another D has accepted. A leg
that fails before any token reached the client is tried again on other instances (fresh request ids
on both, so nothing of the failed leg can mix in). Once tokens have been sent, a failed decode
instance ends the request with an error, or, if configured, a new leg prefills prompt + tokens so
far elsewhere and carries on.

The router detokenizes (instances send token ids) through the same RequestState as the in-process
engine client: stop strings are matched here, and a match aborts the request on D.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator

import grpc

from scheduler.sampling_params import SamplingParams
from serving.config import DeployConfig
from serving.instance import wire
from serving.router.pool import InstancePool, InstanceState
from scheduler.engine_core import EngineCoreOutput
from serving.engine.output_processor import RequestState
from serving.engine.protocol import EngineDeadError, RequestOutput, RequestRejectedError

logger = logging.getLogger(__name__)

_MAX_LEGS = 4
_MIN_BACKOFF_S = 0.01
_MAX_BACKOFF_S = 0.5
# transport failures that mean the instance is gone (anything else fails the request only)
_DEAD_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)


class InstanceFailed(Exception):
    """A call to an instance failed. `dead`: the instance is gone (it is marked failed, its other
    streams fail too); `draining`: it refused a new request while shutting down (no more requests go
    there, its running streams go on)."""

    def __init__(self, state: InstanceState, reason: str, dead: bool = True, draining: bool = False,
                 client=None, exited: bool = False) -> None:
        super().__init__(reason)
        self.state, self.reason, self.dead, self.draining = state, reason, dead and not draining, draining
        self.client = client  # the incarnation that failed (None: the current one)
        self.exited = exited  # its connection is gone (UNAVAILABLE): the process exited, rather than hung

    @property
    def current(self) -> bool:
        """The failure is the instance's as it is now, not one of an incarnation since restarted."""
        return self.client is None or self.client is self.state.client


class _NoRoom(Exception):
    """A decode instance has no free blocks for the request (backpressure)."""


class _Aborted(Exception):
    """The router was asked to abort the request."""


class _Stream:
    """One Generate call to one instance, registered with it so that the pool can fail it."""

    def __init__(self, state: InstanceState, call) -> None:
        self.state = state
        self.call = call
        self.interruption: Exception | None = None
        self.closed = False
        self.num_queued_tokens = 0  # a prefill stream's prompt, counted in its instance's queue until closed
        self.client = state.client  # the incarnation the call went to
        state.streams.add(self)

    def fail(self, reason: str) -> None:
        self.interrupt(InstanceFailed(self.state, reason, client=self.client))

    def interrupt(self, error: Exception) -> None:
        self.interruption = error
        self.call.cancel()

    async def read(self, timeout_s: float):
        """The next message. Raises InstanceFailed, RequestRejectedError, _NoRoom, _Aborted or
        asyncio.TimeoutError (nothing within timeout_s)."""
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns a message that arrived as the
            # task was cancelled and drops the cancellation (the client's stream then runs to its end)
            async with asyncio.timeout(timeout_s):
                message = await self.call.read()
        except (asyncio.CancelledError, grpc.aio.AioRpcError) as e:
            cancelled = isinstance(e, asyncio.CancelledError)
            if cancelled and asyncio.current_task().cancelling():
                raise  # this task is being cancelled (the client went away): that wins
            if self.interruption is not None:  # we cancelled the call, and say why
                raise self.interruption from None
            if cancelled:
                raise
            code = e.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise RequestRejectedError(e.details()) from None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise _NoRoom(e.details()) from None
            if code == grpc.StatusCode.UNAVAILABLE and wire.is_draining(e.details()):
                raise InstanceFailed(self.state, e.details(), draining=True, client=self.client) from None
            raise InstanceFailed(self.state, f"{code.name}: {e.details()}", dead=code in _DEAD_CODES,
                                 client=self.client, exited=code == grpc.StatusCode.UNAVAILABLE) from None
        if message is grpc.aio.EOF:
            raise InstanceFailed(self.state, "its stream ended before the request finished", client=self.client)
        return message

    def close(self) -> None:
        """Cancelling an unfinished call aborts the request on the instance (its blocks are freed)."""
        self.closed = True
        self.state.streams.discard(self)
        self.call.cancel()


class RequestFlow:
    def __init__(self, pool: InstancePool, tokenizer, deploy: DeployConfig, request_id: str,
                 prompt_token_ids: list[int], params: SamplingParams, counters: dict[str, int],
                 client_id: str = "", priority: int = 0) -> None:
        self.pool = pool
        self.deploy = deploy
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.client_id = client_id
        self.priority = priority
        self.counters = counters  # the router's, advanced here
        self.state = RequestState(request_id, tokenizer, prompt_token_ids, params)
        self.aborted = False
        self._streams: set[_Stream] = set()

    @property
    def output_token_ids(self) -> list[int]:
        """Tokens the client has been sent (over every leg)."""
        return self.state.output_token_ids

    def abort(self) -> None:
        self.aborted = True
        for stream in list(self._streams):
            stream.interrupt(_Aborted())

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """RequestOutputs exactly as AsyncLLM would give them (text deltas, finish reasons, usage)."""
        try:
            for leg in range(_MAX_LEGS):
                try:
                    # aclosing: a client gone mid-leg ends the leg now (its finally frees what it holds)
                    async with contextlib.aclosing(self._leg(leg)) as leg_outputs:
                        async for output in leg_outputs:
                            yield output
                    return
                except InstanceFailed as e:
                    self._note_failure(e)
                    if self.aborted:
                        break
                    self._check_retry(e)
                except _Aborted:
                    break
            if not self.aborted:
                raise EngineDeadError(f"request {self.request_id} failed on {_MAX_LEGS} instance pairs "
                                      "in a row")
            yield self._emit(EngineCoreOutput(self.request_id, [], finished=True, finish_reason="abort"))
        finally:
            for stream in list(self._streams):
                self._close(stream)

    def _note_failure(self, error: InstanceFailed) -> None:
        if not error.current:  # the instance has been restarted since: the new one is not at fault
            return
        if error.dead:
            self.pool.mark_failed(error.state, error.reason, exited=error.exited)
        elif error.draining:
            self.pool.mark_draining(error.state)

    def _check_retry(self, error: InstanceFailed) -> None:
        """Raise EngineDeadError unless another leg should be tried after this failure."""
        if not self.output_token_ids or error.draining:  # a refused leg sent nothing: try elsewhere
            self.counters["num_reroutes"] += 1
            logger.warning("request %s: %s failed (%s); trying other instances", self.request_id,
                           error.state.name, error.reason)
            return
        self.counters["num_decode_failures"] += 1
        if self.deploy.reprefill_on_decode_failure and error.dead:
            self.counters["num_reprefills"] += 1
            logger.warning("request %s: %s failed after %d tokens (%s); prefilling again elsewhere",
                           self.request_id, error.state.name, len(self.output_token_ids), error.reason)
            return
        raise EngineDeadError(
            f"{error.state.role} instance {error.state.name} failed while streaming request "
            f"{self.request_id} after {len(self.output_token_ids)} tokens ({error.reason}); the request "
            "cannot finish (--reprefill-on-decode-failure would continue it on another instance)")

    # ---- one leg ----
    async def _leg(self, leg: int) -> AsyncIterator[RequestOutput]:
        leg_id = f"{self.request_id}@{leg}"  # fresh on every leg: nothing of a failed leg can mix in
        prompt = self.prompt_token_ids + self.output_token_ids
        params = self._leg_params()
        if self.pool.replicas:
            async for output in self._replica_leg(leg_id, prompt, params):
                yield output
            return
        decode_stream, prefill_stream, leg_id = await self._reserve_decode(leg_id, prompt, params)
        decode = decode_stream.state  # its num_active counts this leg until the finally below
        try:
            if prefill_stream is None:
                prefill_stream = await self._open_prefill(leg_id, prompt, params, decode)
            first = await self._first_output(prefill_stream)
            if first.finish_reason != "remote_decode":  # a real stop (or an error) at the first token
                yield self._emit(first)
                return
            handoff = asyncio.ensure_future(decode.client.set_first_token(leg_id, first.new_token_ids[0]))
            try:
                output = self._emit(first)
                yield output  # the client has its first token before the KV has moved
                if output.finished:  # a stop string
                    return
                await self._await_handoff(handoff, decode)
            finally:
                handoff.cancel()
            while True:
                output = self._emit(wire.output_from_proto(await self._read(decode_stream)))
                if output.kv_transfer:
                    self._count_kv_transfer(output.kv_transfer, decode)
                yield output
                if output.finished:
                    return
        finally:
            decode.num_active -= 1
            self._close(decode_stream)
            if prefill_stream is not None:
                self._close(prefill_stream)

    async def _replica_leg(self, leg_id: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """The whole request on one replica; its prompt counts as queued there until the first output."""
        replica = self.pool.pick_replica()
        if replica is None:
            await self._wait_for_instance("colocated", self.deploy.instance_start_timeout_s)
            replica = self.pool.pick_replica()
            if replica is None:
                raise EngineDeadError("no replica is up")
        stream = self._open(replica, replica.client.generate(leg_id, prompt, params, client_id=self.client_id,
                                                             priority=self.priority))
        replica.num_queued_prefill_tokens += len(prompt)
        replica.num_active += 1
        queued = True
        try:
            while True:
                output = self._emit(wire.output_from_proto(await self._read(stream)))
                if queued:
                    queued = False
                    replica.num_queued_prefill_tokens = max(0, replica.num_queued_prefill_tokens - len(prompt))
                yield output
                if output.finished:
                    return
        finally:
            if queued:
                replica.num_queued_prefill_tokens = max(0, replica.num_queued_prefill_tokens - len(prompt))
            replica.num_active -= 1
            self._close(stream)

    def _leg_params(self) -> SamplingParams:
        num_sent = len(self.output_token_ids)
        if not num_sent:
            return self.params
        # a continuation: the tokens sent so far are now part of the prompt
        changes = {"min_tokens": max(0, self.params.min_tokens - num_sent)}
        if self.params.max_tokens is not None:
            changes["max_tokens"] = self.params.max_tokens - num_sent
        return self.params.clone(**changes)

    async def _reserve_decode(self, leg_id: str, prompt: list[int],
                              params: SamplingParams) -> tuple[_Stream, _Stream | None, str]:
        """Open the decode stream on the best instance with room; wait (bounded) for room. Returns it,
        the prefill stream opened while it reserved (None: the prefill is not started yet) and the id
        the leg goes on under: every reservation attempt has its own (leg_id, then leg_id.1, .2, ...).
        A refused attempt's streams are closed, but the instances drop its request asynchronously: a
        retry under the same id was refused as a duplicate by whichever still held it (the client got
        a 400 for a request that only had to wait for KV room)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deploy.instance_timeout_s
        backoff = _MIN_BACKOFF_S
        attempt = 0
        while True:
            candidates = self.pool.decode_candidates()
            for decode in candidates:
                early = self.deploy.prefill_while_reserving and self.pool.routing.prefill_while_reserving(
                    decode, self._num_blocks(decode, prompt))
                attempt_id = leg_id if attempt == 0 else f"{leg_id}.{attempt}"
                attempt += 1
                stream, prefill = await self._try_reserve(decode, attempt_id, prompt, params, early)
                if stream is not None:
                    return stream, prefill, attempt_id
            if self.aborted:
                raise _Aborted()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise EngineDeadError(
                    f"no decode instance could take request {self.request_id} within "
                    f"{self.deploy.instance_timeout_s:.0f}s (" + ("all are out of free KV blocks" if candidates
                                                                else "none is up") + ")")
            if candidates:
                self.counters["num_kv_waits"] += 1
                await asyncio.sleep(min(backoff, remaining))
                backoff = min(2 * backoff, _MAX_BACKOFF_S)
            else:
                await self._wait_for_instance("decode", remaining)

    async def _try_reserve(self, decode: InstanceState, leg_id: str, prompt: list[int], params: SamplingParams,
                           early: bool = False) -> tuple[_Stream | None, _Stream | None]:
        """The decode stream once `decode` has reserved the blocks (counted in its load), None when it
        has no room or is gone; and with `early` the prefill stream opened as soon as the reservation
        was sent (closed, and counted, when the reservation fails: it would send to no one)."""
        num_blocks = self._num_blocks(decode, prompt)
        # counted before the answer comes, so that requests arriving together spread over instances
        decode.num_active += 1
        decode.num_blocks_reserved_since_poll += num_blocks
        stream = self._open(decode, decode.client.generate(leg_id, prompt, params, remote_prefill=True,
                                                           client_id=self.client_id, priority=self.priority))
        prefill = self._open_prefill_now(leg_id, prompt, params, decode) if early else None
        accepted = False
        try:
            message = await stream.read(self.deploy.instance_timeout_s)
            if not message.accepted:
                raise EngineDeadError(f"decode instance {decode.name} answered a reservation with an "
                                      "output; is it running the same pdserve version?")
            accepted = True
            return stream, prefill
        except (_NoRoom, asyncio.TimeoutError):
            return None, None
        except InstanceFailed as e:
            self._note_failure(e)
            return None, None
        finally:
            if not accepted:
                if prefill is not None:
                    self.counters["num_early_prefills_cancelled"] += 1
                    self._close(prefill)
                self._close(stream)
                decode.num_active -= 1
                decode.num_blocks_reserved_since_poll = max(
                    0, decode.num_blocks_reserved_since_poll - num_blocks)

    @staticmethod
    def _num_blocks(decode: InstanceState, prompt: list[int]) -> int:
        return -(-(len(prompt) + 1) // decode.launched.info.block_size)  # the prompt and the first token

    async def _open_prefill(self, leg_id: str, prompt: list[int], params: SamplingParams,
                            decode: InstanceState) -> _Stream:
        """The Generate stream on the prefill instance routing picks (waiting, bounded, for one to be up)."""
        stream = self._open_prefill_now(leg_id, prompt, params, decode)
        if stream is None:
            await self._wait_for_instance("prefill", self.deploy.instance_start_timeout_s)
            stream = self._open_prefill_now(leg_id, prompt, params, decode)
            if stream is None:
                raise EngineDeadError("no prefill instance is up")
        return stream

    def _open_prefill_now(self, leg_id: str, prompt: list[int], params: SamplingParams,
                          decode: InstanceState) -> _Stream | None:
        """None: no prefill instance is up. Its prompt counts as queued there until the stream is closed
        (closing it unanswered aborts the prompt there, and its KV send)."""
        prefill = self.pool.pick_prefill()
        if prefill is None:
            return None
        stream = self._open(prefill, prefill.client.generate(leg_id, prompt, params, kv_peer=decode.kv_address,
                                                             client_id=self.client_id, priority=self.priority))
        stream.num_queued_tokens = len(prompt)
        prefill.num_queued_prefill_tokens += len(prompt)
        return stream

    async def _first_output(self, stream: _Stream) -> EngineCoreOutput:
        """P's only output: the first token (finish_reason remote_decode) or a real stop."""
        try:
            return wire.output_from_proto(await self._read(stream))
        finally:
            self._close(stream)

    async def _await_handoff(self, handoff: asyncio.Future, decode: InstanceState) -> None:
        try:
            await handoff
        except grpc.aio.AioRpcError as e:
            raise InstanceFailed(decode, f"handing it the first token failed ({e.code().name}: "
                                 f"{e.details()})", dead=e.code() in _DEAD_CODES) from None

    async def _wait_for_instance(self, role: str, timeout_s: float) -> None:
        if not self.deploy.restart_failed_instances:
            raise EngineDeadError(f"no {role} instance is up (restarts are off: --restart-failed-instances)")
        await self.pool.wait_for_change(timeout_s)
        if self.aborted:
            raise _Aborted()

    async def _read(self, stream: _Stream):
        try:
            return await stream.read(self.deploy.instance_timeout_s)
        except asyncio.TimeoutError:
            raise EngineDeadError(f"{stream.state.role} instance {stream.state.name} sent nothing for "
                                  f"{self.deploy.instance_timeout_s:.0f}s (--instance-timeout-s) while "
                                  f"serving request {self.request_id}") from None

    def _open(self, state: InstanceState, call) -> _Stream:
        stream = _Stream(state, call)
        self._streams.add(stream)
        if self.aborted:
            stream.interrupt(_Aborted())
        return stream

    def _close(self, stream: _Stream) -> None:
        self._streams.discard(stream)
        if stream.num_queued_tokens:
            state = stream.state
            state.num_queued_prefill_tokens = max(0, state.num_queued_prefill_tokens - stream.num_queued_tokens)
            stream.num_queued_tokens = 0
        stream.close()

    def _count_kv_transfer(self, outcome: str, decode: InstanceState) -> None:
        """Per request: did its KV move, or did the decode instance recompute the prompt (and why)."""
        if outcome == "transferred":
            self.counters["num_kv_transferred"] += 1
            return
        self.counters["num_kv_recomputed"] += 1
        logger.warning("request %s: decode instance %s %s", self.request_id, decode.name, outcome)

    # ---- outputs ----
    def _emit(self, source: EngineCoreOutput) -> RequestOutput:
        """The client's RequestOutput for an instance's output. A prefill's first token finishes its
        leg ("remote_decode"), not the request."""
        finished = source.finished and source.finish_reason != "remote_decode"
        output = self.state.process(source, finished=finished)
        assert output is not None, "an output after the request finished"
        return output
