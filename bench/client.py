"""Streaming OpenAI client for /v1/completions and /v1/chat/completions, timing every chunk.

Definitions follow `vllm bench serve`: TTFT is the time from sending to the first streamed chunk that
carries output, ITL the gaps between later such chunks, E2EL the time to the last one; output token
counts come from the usage the server sends last (stream_options.include_usage). Two kinds of chunk
carry no output and are not timed, so servers that send them are not flattered or penalised: a chat
chunk with only the assistant role and no content (some servers send it before any token exists),
and a closing chunk with a finish_reason and no text.

A payload with `"stream": false` gets one JSON reply: its arrival is the only token time (TTFT and
E2EL are both the time to the whole reply).
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable

import httpx

from bench.config import EndpointConfig
from bench.records import RequestRecord

_ERROR_TEXT_LIMIT = 500


def build_payload(endpoint: EndpointConfig, model: str, prompt: str | list[int] | list[dict[str, str]],
                  max_tokens: int, tenant: str | None, priority: int | None = None) -> dict[str, Any]:
    """Request body; `prompt` is a list of chat messages for the chat endpoint."""
    payload: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,  # always set: output lengths are part of the workload
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    payload["messages" if endpoint.is_chat else "prompt"] = prompt
    if endpoint.ignore_eos:
        payload["ignore_eos"] = True
    if endpoint.temperature is not None:
        payload["temperature"] = endpoint.temperature
    if tenant is not None:
        payload["user"] = tenant  # OpenAI's field for the end user; per-tenant fairness keys on it
    if priority is not None:
        payload["priority"] = priority  # vLLM's extension field (--scheduling-policy priority)
    payload.update(endpoint.extra_body)
    return payload


class StreamAccumulator:
    """Folds the lines of one SSE response into timings; `now_s` is passed in so tests can drive it."""

    def __init__(self, is_chat: bool, start_s: float):
        self.is_chat = is_chat
        self.start_s = start_s
        self.token_times_s: list[float] = []
        self.text_parts: list[str] = []
        self.usage: dict[str, Any] = {}
        self.finish_reasons: list[str] = []
        self.error = ""

    def feed(self, line: str, now_s: float) -> None:
        line = line.strip()
        if not line.startswith("data:"):
            return  # blank separators, ": keep-alive" comments, "event:" lines
        data = line[len("data:"):].strip()
        if data == "[DONE]" or not data:
            return
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            self.error = f"unparsable stream chunk: {data[:200]}"
            return
        if "error" in chunk:
            error = chunk["error"]
            self.error = str(error.get("message", error) if isinstance(error, dict) else error)
            return
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choices = chunk.get("choices") or []
        self.finish_reasons += [c["finish_reason"] for c in choices if c.get("finish_reason") is not None]
        if choices and self._carries_output(choices[0]):
            self.token_times_s.append(now_s)
            self.text_parts.append(self._text(choices[0]))

    def feed_reply(self, reply: dict[str, Any], now_s: float) -> None:
        """A whole (non-streamed) reply that arrived at now_s."""
        if "error" in reply:
            error = reply["error"]
            self.error = str(error.get("message", error) if isinstance(error, dict) else error)
            return
        if isinstance(reply.get("usage"), dict):
            self.usage = reply["usage"]
        choices = reply.get("choices") or []
        self.finish_reasons += [c["finish_reason"] for c in choices if c.get("finish_reason") is not None]
        if choices:
            first = choices[0]
            self.token_times_s.append(now_s)
            self.text_parts.append((first.get("message") or {}).get("content") or "" if self.is_chat
                                   else first.get("text") or "")

    def _text(self, choice: dict[str, Any]) -> str:
        if not self.is_chat:
            return choice.get("text") or ""
        delta = choice.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")

    def _carries_output(self, choice: dict[str, Any]) -> bool:
        if self._text(choice):
            return True
        if choice.get("finish_reason") is not None:
            return False  # closing chunk
        return not (self.is_chat and "role" in (choice.get("delta") or {}))  # role-only preamble

    def finish(self, record: RequestRecord, count_tokens: Callable[[str], int] | None) -> None:
        """Fill the record's timings, texts and token counts (mutates `record`)."""
        record.generated_text = "".join(self.text_parts)
        record.finish_reasons = list(self.finish_reasons)
        if self.error or not self.token_times_s:
            record.success = False
            record.error = self.error or "the stream ended without any output chunk"
            return
        record.success = True
        record.ttft_s = self.token_times_s[0] - self.start_s
        record.itl_s = [b - a for a, b in zip(self.token_times_s, self.token_times_s[1:])]
        record.e2el_s = self.token_times_s[-1] - self.start_s
        if self.usage.get("prompt_tokens") is not None:
            record.num_prompt_tokens = int(self.usage["prompt_tokens"])
        if self.usage.get("completion_tokens") is not None:
            record.num_output_tokens = int(self.usage["completion_tokens"])
        elif count_tokens is not None:
            record.num_output_tokens = count_tokens(record.generated_text)
        else:
            record.num_output_tokens = len(self.token_times_s)


class StreamingClient:
    """One HTTP connection pool for a whole run; use as `async with StreamingClient(...) as client`."""

    def __init__(self, endpoint: EndpointConfig, count_tokens: Callable[[str], int] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.endpoint = endpoint
        self.count_tokens = count_tokens
        headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        # No pool limit: a capped pool would queue requests inside the client and inflate TTFT;
        # --max-concurrency is enforced by the runner, where the wait is measured.
        self._http = httpx.AsyncClient(
            headers=headers, transport=transport, timeout=httpx.Timeout(endpoint.request_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))

    async def __aenter__(self) -> "StreamingClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._http.aclose()

    async def send(self, payload: dict[str, Any], record: RequestRecord, clock_origin_s: float) -> None:
        """POST one streaming request and fill `record` (mutated; never raises for server faults)."""
        record.start_s = time.perf_counter() - clock_origin_s
        accumulator = StreamAccumulator(self.endpoint.is_chat, record.start_s)
        try:
            async with asyncio.timeout(self.endpoint.request_timeout_s):
                await self._stream(payload, record, accumulator, clock_origin_s)
        except TimeoutError:
            accumulator.error = f"no complete reply within --request-timeout {self.endpoint.request_timeout_s} s"
        except httpx.HTTPError as exc:
            accumulator.error = f"{type(exc).__name__}: {exc}"
        accumulator.finish(record, self.count_tokens)

    async def _stream(self, payload: dict[str, Any], record: RequestRecord,
                      accumulator: StreamAccumulator, clock_origin_s: float) -> None:
        headers = {"x-request-id": record.request_id}
        async with self._http.stream("POST", self.endpoint.url, json=payload, headers=headers) as response:
            record.http_status = response.status_code
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                accumulator.error = f"HTTP {response.status_code}: {_error_message(body)}"
                return
            if payload.get("stream") is False:
                body = await response.aread()
                try:
                    reply = json.loads(body)
                except json.JSONDecodeError:
                    accumulator.error = f"unparsable reply: {body[:200]!r}"
                    return
                accumulator.feed_reply(reply, time.perf_counter() - clock_origin_s)
                return
            async for line in response.aiter_lines():
                accumulator.feed(line, time.perf_counter() - clock_origin_s)


def _error_message(body: str) -> str:
    try:
        error = json.loads(body).get("error", body)
    except (json.JSONDecodeError, AttributeError):
        return body[:_ERROR_TEXT_LIMIT]
    message = error.get("message", error) if isinstance(error, dict) else error
    return str(message)[:_ERROR_TEXT_LIMIT]


async def list_models(base_url: str, api_key: str | None = None, timeout_s: float = 30.0) -> list[dict]:
    """The server's /v1/models entries ({"id", "root", ...}); raises ValueError saying what to check."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/v1/models"
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as http:
            response = await http.get(url, headers=headers)
    except httpx.HTTPError as exc:
        raise ValueError(f"cannot reach {url} ({type(exc).__name__}: {exc}); check --base-url and that "
                         "the server is running") from None
    if response.status_code != 200:
        raise ValueError(f"GET {url} answered HTTP {response.status_code}: {_error_message(response.text)}"
                         "; check --base-url and --api-key")
    return list(response.json().get("data") or [])
