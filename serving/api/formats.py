"""Response bodies and stream chunks in OpenAI's exact shapes, one class per endpoint.

A format only formats: it turns accumulated choices (non-streaming) or one engine output
(streaming) into the dicts the client receives. Generation, aborts and errors live elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from serving.api.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from serving.engine.protocol import RequestOutput, TokenLogprob


@dataclass
class ResponseMeta:
    """What every body and chunk of one response repeats."""
    response_id: str  # cmpl-... / chatcmpl-...
    created: int  # unix seconds
    model: str
    num_top_logprobs: int | None  # None: no logprobs requested
    include_usage: bool = False  # stream_options.include_usage


@dataclass
class ChoiceState:
    """One choice (one engine sub-request) as its outputs arrive."""
    index: int
    text_parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    num_text_chars: int = 0  # characters sent so far: the next text_offset of a stream
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, output: RequestOutput) -> None:
        self.text_parts.append(output.new_text)
        self.num_text_chars += len(output.new_text)
        self.logprobs.extend(output.new_logprobs or [])
        self.num_output_tokens += len(output.new_token_ids)
        self.num_cached_tokens = max(self.num_cached_tokens, output.num_cached_tokens)
        if output.finished:
            self.finish_reason = output.finish_reason
            self.stop_reason = output.stop_reason

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


def usage(num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens,
            "prompt_tokens_details": {"cached_tokens": num_cached_tokens}}


class CompletionFormat:
    response_object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, texts: TokenTexts) -> None:
        self._texts = texts

    def _logprobs(self, meta: ResponseMeta, logprobs: list[TokenLogprob],
                  first_text_offset: int) -> dict | None:
        if meta.num_top_logprobs is None:
            return None
        return completion_logprobs(self._texts, logprobs, meta.num_top_logprobs, first_text_offset)

    def response(self, meta: ResponseMeta, choices: list[ChoiceState], usage_dict: dict) -> dict:
        return {
            "id": meta.response_id, "object": self.response_object, "created": meta.created,
            "model": meta.model,
            "choices": [{"index": c.index, "text": c.text,
                         "logprobs": self._logprobs(meta, c.logprobs, 0),
                         "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                        for c in choices],
            "usage": usage_dict,
        }

    def first_chunks(self, meta: ResponseMeta, choice_indices: list[int]) -> list[dict]:
        return []

    def chunk(self, meta: ResponseMeta, choice: ChoiceState, output: RequestOutput) -> dict:
        """The chunk for `output`; `choice` is its state before `output` was added."""
        logprobs = self._logprobs(meta, output.new_logprobs or [], choice.num_text_chars)
        return _chunk(meta, self.chunk_object, {
            "index": choice.index, "text": output.new_text, "logprobs": logprobs,
            "finish_reason": output.finish_reason if output.finished else None,
            "stop_reason": output.stop_reason if output.finished else None})


class ChatFormat:
    response_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, texts: TokenTexts) -> None:
        self._texts = texts

    def _logprobs(self, meta: ResponseMeta, logprobs: list[TokenLogprob]) -> dict | None:
        if meta.num_top_logprobs is None:
            return None
        return chat_logprobs(self._texts, logprobs, meta.num_top_logprobs)

    def response(self, meta: ResponseMeta, choices: list[ChoiceState], usage_dict: dict) -> dict:
        return {
            "id": meta.response_id, "object": self.response_object, "created": meta.created,
            "model": meta.model,
            "choices": [{"index": c.index,
                         "message": {"role": "assistant", "content": c.text},
                         "logprobs": self._logprobs(meta, c.logprobs),
                         "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                        for c in choices],
            "usage": usage_dict,
        }

    def first_chunks(self, meta: ResponseMeta, choice_indices: list[int]) -> list[dict]:
        # OpenAI streams announce the role once per choice before any content
        return [_chunk(meta, self.chunk_object, {
            "index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
            "finish_reason": None}) for index in choice_indices]

    def chunk(self, meta: ResponseMeta, choice: ChoiceState, output: RequestOutput) -> dict:
        delta = {"content": output.new_text} if output.new_text or not output.finished else {}
        return _chunk(meta, self.chunk_object, {
            "index": choice.index, "delta": delta,
            "logprobs": self._logprobs(meta, output.new_logprobs or []),
            "finish_reason": output.finish_reason if output.finished else None,
            "stop_reason": output.stop_reason if output.finished else None})


def _chunk(meta: ResponseMeta, chunk_object: str, choice: dict) -> dict:
    body = {"id": meta.response_id, "object": chunk_object, "created": meta.created,
            "model": meta.model, "choices": [choice]}
    if meta.include_usage:
        body["usage"] = None  # only the last chunk carries usage
    return body


def usage_chunk(meta: ResponseMeta, chunk_object: str, usage_dict: dict) -> dict:
    return {"id": meta.response_id, "object": chunk_object, "created": meta.created,
            "model": meta.model, "choices": [], "usage": usage_dict}
