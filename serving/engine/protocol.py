"""What the HTTP layer (and the offline API) sees of an engine, whatever the placement mode.

Colocated mode implements `EngineClient` with an in-process engine core; disaggregated mode with a
router over remote instances. The API server depends on nothing else of the engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from scheduler.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine (or the instance that held the request) died; the request cannot finish.

    The message reaches the client (the 503, or the error event of a stream): say what failed and
    whether a retry can help, in one line, without internals such as stack traces."""


class RequestRejectedError(ValueError):
    """The request cannot be served as sent (e.g. too long); the message says what to change."""


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    # top-k alternatives (token_id, logprob), best first; empty when logprobs=0
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """One increment of one request's output (one per engine step that produced tokens).

    `new_token_ids`/`new_text`/`new_logprobs` are deltas since the previous output of the same
    request. The last output has `finished=True` and a `finish_reason` ("stop", "length", "abort").
    """
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    new_logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # cumulative
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # set when finish_reason == "error"
    queue_time_s: float | None = None  # arrival -> first scheduled; set on the first output
    # disaggregated, on the last output: whether the prompt's KV was "transferred" from the prefill
    # instance or "recomputed: <why>" on the decode instance
    kv_transfer: str | None = None


@dataclass
class EngineStats:
    """Point-in-time engine state for gauges (summed over instances in disaggregated mode)."""
    num_running: int = 0
    num_waiting: int = 0
    num_swapped: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    num_preemptions: int = 0  # cumulative
    prefix_cache_queries: int = 0  # cumulative prompt tokens looked up
    prefix_cache_hits: int = 0  # cumulative prompt tokens found cached
    extra: dict = field(default_factory=dict)  # mode-specific counters (e.g. KV transfer bytes)


@dataclass
class ModelInfo:
    name: str  # served model name (what clients put in "model")
    path: str
    max_model_len: int
    created: int


class EngineClient(Protocol):
    model_info: ModelInfo
    tokenizer: object  # a transformers PreTrainedTokenizerFast

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 client_id: str = "", priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Submit one sequence (n is expanded by the caller) and iterate its outputs. client_id: whom
        it serves (the OpenAI `user` field); priority: lower first under priority scheduling.

        Raises RequestRejectedError (before the first output) for requests that cannot be served,
        EngineDeadError if the engine dies. Cancelling the iterator (client gone) aborts the
        request and frees its KV blocks.
        """

    async def abort(self, request_id: str) -> None: ...

    def is_healthy(self) -> bool: ...

    def get_stats(self) -> EngineStats:
        """The latest stats, without waiting (cached figures where they come from elsewhere)."""

    async def refresh_stats(self) -> None:
        """Bring get_stats() up to date (a metrics scrape awaits this first)."""

    async def shutdown(self) -> None: ...
