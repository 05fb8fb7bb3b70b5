"""Answer one generation request: one JSON body, or a Server-Sent-Events stream.

Streams: "data: {chunk}\\n\\n" per output, then an optional usage chunk, then "data: [DONE]\\n\\n".
The stream starts only once the first output is in, so a request the engine rejects (or a dead
engine) still gets its proper status code instead of a 200 followed by an error event; an error after
that point is sent as an `{"error": ...}` event, as vLLM does.
"""
from __future__ import annotations

import json
import logging

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.api.errors import ApiError, to_api_error
from serving.api.formats import ChoiceState, ResponseMeta, usage, usage_chunk
from serving.api.generation import ClientDisconnected, Generation, SubRequest
from serving.engine.protocol import RequestOutput

logger = logging.getLogger(__name__)

# nginx's "client closed request": nobody reads it, but logs show why the request ended
CLIENT_CLOSED = 499


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def _check_output(output: RequestOutput) -> None:
    if output.finish_reason == "error":
        logger.error("engine failed request %s: %s", output.request_id, output.error)
        raise ApiError(500, f"The engine failed while generating {output.request_id}; "
                            "the details are in the server log.")


class Responder:
    """One request's answer. `fmt` is a CompletionFormat or ChatFormat."""

    def __init__(self, generation: Generation, sub_requests: list[SubRequest], fmt,
                 meta: ResponseMeta, prompt_ids_list: list[list[int]], n: int) -> None:
        self._generation = generation
        self._fmt = fmt
        self._meta = meta
        self._choices = {sub.choice_index: ChoiceState(sub.choice_index) for sub in sub_requests}
        self._prompt_lens = [len(ids) for ids in prompt_ids_list]
        self._n = n

    def _usage(self) -> dict:
        num_completion_tokens = sum(c.num_output_tokens for c in self._choices.values())
        # the prompt is counted once per prompt, not once per choice (as OpenAI does)
        num_cached = sum(self._choices[p * self._n].num_cached_tokens
                         for p in range(len(self._prompt_lens)))
        return usage(sum(self._prompt_lens), num_completion_tokens, num_cached)

    async def json_response(self) -> Response:
        try:
            while (item := await self._generation.next_output()) is not None:
                sub, output = item
                _check_output(output)
                self._choices[sub.choice_index].add(output)
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED)
        finally:
            self._generation.close()
        choices = [self._choices[i] for i in sorted(self._choices)]
        return JSONResponse(self._fmt.response(self._meta, choices, self._usage()))

    async def stream_response(self, request: Request) -> Response:
        try:
            first = await self._generation.next_output()
            if first is not None:
                _check_output(first[1])
        except ClientDisconnected:
            self._generation.close()
            return Response(status_code=CLIENT_CLOSED)
        except BaseException:
            self._generation.close()
            raise
        return StreamingResponse(self._events(first, request.url.path),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, item: tuple[SubRequest, RequestOutput] | None, path: str):
        meta = self._meta
        try:
            for chunk in self._fmt.first_chunks(meta, sorted(self._choices)):
                yield _sse(chunk)
            while item is not None:
                sub, output = item
                _check_output(output)
                choice = self._choices[sub.choice_index]
                if output.new_token_ids or output.new_text or output.finished:
                    yield _sse(self._fmt.chunk(meta, choice, output))
                choice.add(output)
                item = await self._generation.next_output()
            if meta.include_usage:
                yield _sse(usage_chunk(meta, self._fmt.chunk_object, self._usage()))
            yield _sse("[DONE]")
        except ClientDisconnected:
            return
        except Exception as exc:
            yield _sse(to_api_error(exc, path).body())
            yield _sse("[DONE]")
        finally:
            # also reached when the server cancels this stream because the client went away
            self._generation.close()
