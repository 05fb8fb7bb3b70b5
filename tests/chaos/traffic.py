"""Client traffic of the chaos suite: streaming requests over HTTP whose progress a scenario can watch
(to strike mid-stream), a disconnect storm, and what a finished stream must look like.

Every request here is greedy or seeded, ignores EOS and streams, so a stream that finishes has
exactly `max_tokens` tokens per choice and ends with finish_reason "length" on each.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import random
from dataclasses import dataclass, field

import httpx

from tests.serving.test_disagg_support import make_prompts

_WORDS = ("storm", "decode", "prefill", "block", "lease", "token", "stream", "chaos", "cache", "router")


@dataclass
class Stream:
    """One streaming request and what came back; `num_chunks` grows while it runs."""
    endpoint: str  # "/v1/completions" or "/v1/chat/completions"
    payload: dict
    status: int | None = None
    chunks: list[dict] = field(default_factory=list)  # the parsed data events, [DONE] aside
    done: bool = False  # [DONE] arrived
    error: str = ""  # an error event's message, a non-200 body, or a transport error
    error_type: str | None = None  # OpenAI's error type, e.g. service_unavailable
    closed_early: bool = False  # the client went away on purpose

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    @property
    def finished(self) -> bool:
        return self.done and not self.error and not self.closed_early

    def text(self) -> list[str]:
        """The text of each choice."""
        texts = [""] * self.payload.get("n", 1)
        for chunk in self.chunks:
            for choice in chunk.get("choices") or []:
                piece = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                texts[choice["index"]] += piece or ""
        return texts

    def problems(self) -> list[str]:
        """What is wrong with a stream that ran to its end (empty when it is well formed)."""
        if self.status != 200:
            return [f"HTTP {self.status}: {self.error}"]
        if self.error:
            return [f"error event: {self.error}"]
        if not self.done:
            return ["the stream ended without [DONE]"]
        problems = []
        n = self.payload.get("n", 1)
        reasons = [(c["index"], c["finish_reason"]) for chunk in self.chunks for c in chunk.get("choices") or []
                   if c.get("finish_reason") is not None]
        if sorted(reasons) != [(i, "length") for i in range(n)]:
            problems.append(f"finish reasons {reasons}, expected 'length' once for each of {n} choices")
        usage = [chunk["usage"] for chunk in self.chunks if chunk.get("usage")]
        if self.payload.get("stream_options", {}).get("include_usage"):
            expected = n * self.payload["max_tokens"]
            if len(usage) != 1 or self.chunks[-1].get("choices") != [] or \
                    usage[0]["completion_tokens"] != expected:
                problems.append(f"usage {usage} (last chunk {self.chunks[-1:]}), expected one closing usage "
                                f"chunk with {expected} completion tokens")
        elif usage:
            problems.append(f"usage {usage} sent without include_usage")
        return problems

    async def run(self, http: httpx.AsyncClient, base_url: str, close_after_chunks: int | None = None) -> "Stream":
        """Send it and read to the end, or go away after `close_after_chunks` data events. Records
        what happened instead of raising (cancellation aside)."""
        try:
            async with http.stream("POST", base_url + self.endpoint, json=self.payload) as response:
                self.status = response.status_code
                if response.status_code != 200:
                    self._set_error((await response.aread()).decode(errors="replace"))
                    return self
                async for line in response.aiter_lines():
                    if close_after_chunks is not None and self.num_chunks >= close_after_chunks:
                        self.closed_early = True
                        return self  # leaving the block closes the connection mid-stream
                    self._feed(line)
        except httpx.HTTPError as e:
            self.error = f"{type(e).__name__}: {e}"
        return self

    def _feed(self, line: str) -> None:
        if not line.startswith("data:"):
            return
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            self.done = True
            return
        chunk = json.loads(data)
        if "error" in chunk:
            self._set_error(data)
        else:
            self.chunks.append(chunk)

    def _set_error(self, body: str) -> None:
        try:
            error = json.loads(body)["error"]
            self.error, self.error_type = error["message"], error.get("type")
        except (ValueError, KeyError, TypeError):
            self.error = body[:500] or "(empty body)"


def completion(model: str, prompt: list[int] | str, max_tokens: int, **fields) -> Stream:
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
               "stream": True, **fields}
    return Stream("/v1/completions", payload)


def chat(model: str, content: str, max_tokens: int, **fields) -> Stream:
    payload = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
               "temperature": 0, "ignore_eos": True, "stream": True, **fields}
    return Stream("/v1/chat/completions", payload)


def long_prompt_streams(model: str, seed: int, num_requests: int, prompt_len: int, max_tokens: int) -> list[Stream]:
    """Greedy completions of distinct long token-id prompts (several KV blocks to move each)."""
    return [completion(model, p, max_tokens) for p in make_prompts(seed, [prompt_len] * num_requests)]


def new_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(60.0),
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


async def run_all(base_url: str, streams: list[Stream], timeout_s: float) -> list[Stream]:
    """Run every stream to its end; AssertionError naming the streams still open after timeout_s."""
    async with new_client() as http:
        tasks = [asyncio.ensure_future(s.run(http, base_url)) for s in streams]
        return await finish(tasks, streams, timeout_s)


async def finish(tasks: list[asyncio.Future], streams: list[Stream], timeout_s: float) -> list[Stream]:
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    assert not pending, (f"{len(pending)} of {len(tasks)} streams hung for {timeout_s:.0f} s, e.g. "
                         + "; ".join(f"{s.endpoint} after {s.num_chunks} chunks" for s, t in zip(streams, tasks)
                                     if t in pending)[:1000])
    for task in done:
        task.result()  # a bug in this module, not the server's
    return streams


async def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.005) -> None:
    """Until condition() holds; AssertionError saying `what` was awaited."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        await asyncio.sleep(poll_s)


def assert_failed_clearly(stream: Stream) -> None:
    """An error the client can act on: an OpenAI-shaped 503 (a status, or an error event and [DONE]
    in a stream that had begun), never a hang or a bare connection drop."""
    if stream.status == 200:
        ok = stream.done and stream.error and stream.error_type == "service_unavailable"
    else:
        ok = stream.status == 503 and stream.error_type == "service_unavailable"
    assert ok, f"not a clear error: HTTP {stream.status}, {stream.error_type}: {stream.error!r}, done={stream.done}"


def assert_victims_failed_cleanly(streams: list[Stream], num_held: int, victim: str) -> None:
    """The streams the victim held (num_held of them) fail clearly; every other one finishes."""
    failed = [s for s in streams if not s.finished]
    assert 0 < num_held < len(streams), f"{victim} held {num_held} of {len(streams)} streams: not spread"
    assert len(failed) == num_held, (f"{len(failed)} streams failed, {victim} held {num_held}: "
                                     + "; ".join(s.error for s in failed))
    for stream in failed:
        assert_failed_clearly(stream)
    for stream in streams:
        if stream.finished:
            assert not stream.problems(), stream.problems()


# ---- the disconnect storm ----
@dataclass
class StormRequest:
    stream: Stream
    close_after_chunks: int | None = None  # the client reads this many events, then closes
    cancel_after_s: float | None = None  # the client's task is cancelled after this long


def storm(model: str, num_requests: int, seed: int) -> list[StormRequest]:
    """A mix of completions and chats, a third with n=2, half with include_usage, a few seeded
    samples; about half of the clients go away early: a fifth of all close the response after a few
    events, a quarter have their task cancelled within 100 ms of sending (while the server is still
    admitting the request, the riskiest moment), a tenth within 1.5 s."""
    rng = random.Random(seed)
    prompts = make_prompts(seed, [rng.randrange(4, 80) for _ in range(num_requests)])
    requests = []
    for prompt in prompts:
        fields = {"n": rng.choice((1, 1, 2))}
        if rng.random() < 0.5:
            fields["stream_options"] = {"include_usage": True}
        if rng.random() < 0.2:
            fields.update(temperature=0.8, seed=rng.randrange(1000))
        max_tokens = rng.randrange(4, 33)
        if rng.random() < 0.5:
            stream = completion(model, prompt, max_tokens, **fields)
        else:
            words = " ".join(rng.choice(_WORDS) for _ in range(len(prompt) // 2 + 1))
            stream = chat(model, words, max_tokens, **fields)
        request = StormRequest(stream)
        roll = rng.random()
        if roll < 0.2:
            request.close_after_chunks = rng.randrange(0, max_tokens)
        elif roll < 0.45:  # within 100 ms of sending: while the server is still admitting the request
            request.cancel_after_s = rng.uniform(0.0, 0.1)
        elif roll < 0.55:
            request.cancel_after_s = rng.uniform(0.0, 1.5)
        requests.append(request)
    return requests


async def leave_while_admitted(base_url: str, leavers: list[Stream], max_delay_s: float,
                               background: list[Stream], timeout_s: float) -> None:
    """Clients one after another, the k-th of which goes away k/len * max_delay_s after sending: a
    sweep over the moments the server is admitting a request (tokenizing it, reserving KV on a decode
    instance, adding it to a batch). `background` streams run meanwhile and are read to their end:
    they keep the engines stepping, so that admitting a request takes a few steps' time."""
    async with new_client() as http:
        steady = [asyncio.ensure_future(s.run(http, base_url)) for s in background]
        await wait_for(lambda: all(s.num_chunks for s in background), timeout_s, "the background streams to start")
        for index, stream in enumerate(leavers):
            task = asyncio.ensure_future(stream.run(http, base_url))
            await asyncio.sleep(index / len(leavers) * max_delay_s)
            if not task.done():
                stream.closed_early = True
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await finish(steady, background, timeout_s)


async def run_storm(base_url: str, requests: list[StormRequest], timeout_s: float) -> list[StormRequest]:
    """All at once; returns once every request has finished or gone away."""
    async with new_client() as http:
        tasks = [asyncio.ensure_future(r.stream.run(http, base_url, r.close_after_chunks)) for r in requests]

        async def cancel_later(task: asyncio.Future, request: StormRequest) -> None:
            await asyncio.sleep(request.cancel_after_s)
            if not task.done():
                request.stream.closed_early = True
                task.cancel()

        cancellers = [asyncio.ensure_future(cancel_later(t, r)) for t, r in zip(tasks, requests)
                      if r.cancel_after_s is not None]
        await asyncio.gather(*cancellers)
        await asyncio.wait(tasks, timeout=timeout_s)
        pending = [r for t, r in zip(tasks, requests) if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert not pending, f"{len(pending)} of {len(requests)} storm requests hung for {timeout_s:.0f} s"
    return requests


def storm_problems(requests: list[StormRequest]) -> list[str]:
    """Problems of the requests whose client stayed to the end, and of those that went away but had
    been refused or sent an error first (the storm itself must not make the server fail anyone)."""
    problems = []
    for index, request in enumerate(requests):
        stream = request.stream
        if stream.closed_early:
            if stream.error or (stream.status not in (None, 200)):
                problems.append(f"#{index} (left early): HTTP {stream.status}: {stream.error}")
            continue
        problems += [f"#{index} {stream.endpoint} n={stream.payload.get('n', 1)}: {p}" for p in stream.problems()]
    return problems


async def strike_mid_stream(base_url: str, streams: list[Stream], ready, strike, timeout_s: float) -> list[Stream]:
    """Start every stream; once ready() holds, run strike() (kill, stop, ...; awaited if it returns an
    awaitable, while the streams go on); then run them all to their end (AssertionError naming
    those that hang)."""
    async with new_client() as http:
        tasks = [asyncio.ensure_future(s.run(http, base_url)) for s in streams]
        try:
            await wait_for(lambda: ready() or any(t.done() for t in tasks), timeout_s, "the moment to strike")
            early = [s for s, t in zip(streams, tasks) if t.done()]
            assert not early, (f"a stream ended before the strike (after {early[0].num_chunks} chunks, "
                               f"error {early[0].error!r}): make the streams longer")
            struck = strike()
            if inspect.isawaitable(struck):
                await struck
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return await finish(tasks, streams, timeout_s)


def each_has(streams: list[Stream], num_chunks: int):
    return lambda: all(s.num_chunks >= num_chunks for s in streams)
