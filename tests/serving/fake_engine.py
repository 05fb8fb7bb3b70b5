"""A small deterministic `EngineClient` for testing the HTTP layer without a model.

Tokenizer: a real `PreTrainedTokenizerFast`, byte-level with no merges (one ASCII character = one
token), with a chat template, so the API code runs against the real transformers interface.

Generation, one token per step:
- greedy (temperature 0): echoes the prompt cyclically, token j = prompt[j % len(prompt)];
- sampled: letters a-z drawn from `random.Random(seed)` (unseeded: fresh randomness);
- honours max_tokens ("length"), stop strings (text cut before the stop string unless
  include_stop_str_in_output), stop_token_ids and EOS (unless ignore_eos), min_tokens, logprobs.

Records what it was asked: `submitted` (request id, prompt ids, params), `aborted_ids` (by
`abort()` or by the caller closing the iterator early), `active_ids` (iterators still open).
"""
from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass

import httpx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from scheduler.sampling_params import SamplingParams
from serving.engine.protocol import (EngineDeadError, EngineStats, ModelInfo, RequestOutput,
                                     RequestRejectedError, TokenLogprob)

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>",
                                   eos_token="<|eos|>", chat_template=CHAT_TEMPLATE)


@dataclass
class Submitted:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    client_id: str = ""
    priority: int = 0


class FakeEngine:
    def __init__(self, *, name: str = "fake-model", max_model_len: int = 64,
                 token_delay_s: float = 0.0, stall_after_tokens: int | None = None) -> None:
        self.tokenizer = make_tokenizer()
        self.model_info = ModelInfo(name=name, path="/models/fake", max_model_len=max_model_len,
                                    created=1_700_000_000)
        self.token_delay_s = token_delay_s
        # after this many tokens a request waits until it is aborted (a client-gone scenario
        # that cannot finish on its own, however slow the machine)
        self.stall_after_tokens = stall_after_tokens
        self.submitted: list[Submitted] = []
        self.aborted_ids: set[str] = set()
        self.abort_calls: list[str] = []
        self.active_ids: set[str] = set()
        self.stats = EngineStats()
        self.num_refreshes = 0
        self.healthy = True
        self.shutdown_called = False
        # failure injection, checked when a request is submitted
        self.dead = False  # generate raises EngineDeadError(dead_message)
        self.dead_message = ("decode instance decode-0 failed while streaming request cmpl-1-0 after 3 "
                             "tokens (UNAVAILABLE: Socket closed); the request cannot finish")
        self.die_after_tokens: int | None = None  # then the stream raises EngineDeadError
        self.reject_message: str | None = None  # generate raises RequestRejectedError
        self.crash: Exception | None = None  # generate raises this
        # after this many tokens, the next output finishes with finish_reason "error"
        self.error_after_tokens: int | None = None
        self._letter_ids = [self.tokenizer.convert_tokens_to_ids(c)
                            for c in "abcdefghijklmnopqrstuvwxyz"]

    def _next_token(self, prompt_token_ids: list[int], step: int, params: SamplingParams,
                    rng: random.Random) -> int:
        if params.greedy:
            return prompt_token_ids[step % len(prompt_token_ids)]
        return rng.choice(self._letter_ids)

    def _logprob(self, token_id: int, step: int, params: SamplingParams) -> TokenLogprob:
        logprob = -0.25 * (1 + step % 3)
        top = [(token_id, logprob)] + [((token_id + k) % len(self.tokenizer), logprob - k)
                                       for k in range(1, params.logprobs or 0)]
        return TokenLogprob(token_id, logprob, top[:params.logprobs or 0])

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, client_id: str = "", priority: int = 0):
        self.submitted.append(Submitted(request_id, list(prompt_token_ids), params, client_id, priority))
        if self.dead:
            raise EngineDeadError(self.dead_message)
        if self.reject_message is not None:
            raise RequestRejectedError(self.reject_message)
        if self.crash is not None:
            raise self.crash
        self.active_ids.add(request_id)
        finished = False
        try:
            async for output in self._steps(request_id, prompt_token_ids, params):
                finished = output.finished
                yield output
        finally:
            self.active_ids.discard(request_id)
            if not finished:
                self.aborted_ids.add(request_id)

    async def _steps(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        rng = random.Random(params.seed)
        output_ids: list[int] = []
        sent_text = ""
        for step in range(params.max_tokens):
            await asyncio.sleep(self.token_delay_s)
            if self.stall_after_tokens is not None and step >= self.stall_after_tokens:
                await asyncio.Event().wait()  # until cancelled
            if self.die_after_tokens is not None and step >= self.die_after_tokens:
                raise EngineDeadError(self.dead_message)
            base = dict(request_id=request_id, num_prompt_tokens=len(prompt_token_ids),
                        queue_time_s=0.0 if step == 0 else None)
            failing = self.error_after_tokens is not None and step >= self.error_after_tokens
            if failing or request_id in self.aborted_ids:
                reason = "error" if failing else "abort"
                yield RequestOutput(new_token_ids=[], new_text="", finished=True,
                                    finish_reason=reason, error="kernel exploded", **base)
                return
            token_id = self._next_token(prompt_token_ids, step, params, rng)
            output_ids.append(token_id)
            new_text, stop_reason, stopped = self._new_text(output_ids, sent_text, params)
            sent_text += new_text
            finished = stopped or len(output_ids) == params.max_tokens
            if finished and not stopped:
                rest, _, _ = self._new_text(output_ids, sent_text, params, flush=True)
                new_text, sent_text = new_text + rest, sent_text + rest
            logprobs = ([self._logprob(token_id, step, params)]
                        if params.logprobs is not None else None)
            yield RequestOutput(new_token_ids=[token_id], new_text=new_text, finished=finished,
                                finish_reason=("stop" if stopped else "length") if finished else None,
                                stop_reason=stop_reason, new_logprobs=logprobs,
                                num_output_tokens=len(output_ids), **base)
            if finished:
                return

    def _new_text(self, output_ids: list[int], sent_text: str, params: SamplingParams,
                  flush: bool = False) -> tuple[str, int | str | None, bool]:
        """(text delta, stop reason, stopped). Like a real detokenizer, holds back the characters
        that could be the start of a stop string until it is known they are not."""
        token_id = output_ids[-1]
        may_stop = len(output_ids) >= params.min_tokens
        is_eos = token_id == self.tokenizer.eos_token_id and not params.ignore_eos
        if may_stop and (token_id in params.stop_token_ids or is_eos):
            return "", (None if is_eos else token_id), True
        full = self.tokenizer.decode(output_ids, skip_special_tokens=params.skip_special_tokens)
        for stop in params.stop if may_stop else []:
            at = full.find(stop, max(0, len(sent_text) - len(stop) + 1))
            if at >= 0:
                cut = at + len(stop) if params.include_stop_str_in_output else at
                return full[len(sent_text):cut], stop, True
        num_held = 0 if flush else max((len(stop) - 1 for stop in params.stop), default=0)
        return full[len(sent_text):max(len(sent_text), len(full) - num_held)], None, False

    async def abort(self, request_id: str) -> None:
        self.abort_calls.append(request_id)
        self.aborted_ids.add(request_id)

    def is_healthy(self) -> bool:
        return self.healthy

    def get_stats(self) -> EngineStats:
        return self.stats

    async def refresh_stats(self) -> None:
        self.num_refreshes += 1

    async def shutdown(self) -> None:
        self.shutdown_called = True


# ---- helpers shared by the API tests -------------------------------------------------------

def asgi_client(app) -> httpx.AsyncClient:
    """An in-process client: no sockets, the app runs in the test's event loop."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def parse_sse(text: str) -> list[dict | str]:
    """The events of a Server-Sent-Events body: dicts, and the final "[DONE]"."""
    events: list[dict | str] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), f"not an SSE data event: {block!r}"
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events
