"""/v1/completions and /v1/chat/completions: validate, tokenize, fan out, answer.

The order of checks is the order a client fixes things in: body (JSON, fields) -> model ->
sampling values -> prompt -> context length. Each failure is a 4xx `ApiError`.
"""
from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from scheduler.sampling_params import SamplingParams
from serving.api.drain import Drain
from serving.api.errors import ApiError, validation_error
from serving.api.formats import ChatFormat, CompletionFormat, ResponseMeta
from serving.api.generation import Generation, expand_sub_requests
from serving.api.json_body import load_json_object
from serving.api.logprobs import TokenTexts
from serving.api.prompts import chat_prompt_ids, completion_prompt_ids, fit_to_context
from serving.api.protocol import ChatCompletionRequest, CompletionRequest
from serving.api.responder import Responder
from serving.engine.protocol import EngineClient, RequestRejectedError
from serving.engine.validation import check_stop_token_ids
from serving.metrics import ServingMetrics


async def parse_body(request: Request, model_class: type[BaseModel]) -> BaseModel:
    data = load_json_object(await request.body())
    try:
        return model_class.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


class GenerationEndpoints:
    """Handlers of the two generation routes; they share the engine, metrics and formats."""

    def __init__(self, engine: EngineClient, metrics: ServingMetrics, drain: Drain) -> None:
        self._engine, self._drain = engine, drain
        self._metrics = metrics
        texts = TokenTexts(engine.tokenizer)
        self._completion_format = CompletionFormat(texts)
        self._chat_format = ChatFormat(texts)

    async def completions(self, request: Request) -> Response:
        arrival_s = self._metrics.clock()
        body: CompletionRequest = await parse_body(request, CompletionRequest)
        params = self._checked_params(body)
        prompt_ids_list = completion_prompt_ids(self._engine.tokenizer, body)
        meta = ResponseMeta(f"cmpl-{uuid.uuid4().hex}", int(time.time()),
                            self._engine.model_info.name, params.logprobs, body.include_usage)
        return await self._respond(request, body, params, prompt_ids_list, "prompt",
                                   self._completion_format, meta, arrival_s)

    async def chat_completions(self, request: Request) -> Response:
        arrival_s = self._metrics.clock()
        body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
        params = self._checked_params(body)
        prompt_ids = chat_prompt_ids(self._engine.tokenizer, body)
        meta = ResponseMeta(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()),
                            self._engine.model_info.name, params.logprobs, body.include_usage)
        return await self._respond(request, body, params, [prompt_ids], "messages",
                                   self._chat_format, meta, arrival_s)

    def _checked_params(self, body: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
        info = self._engine.model_info
        # vLLM also accepts the model's path as its name
        if body.model not in (info.name, info.path):
            raise ApiError(404, f"The model `{body.model}` does not exist; this server serves "
                                f"`{info.name}`.", param="model", code="model_not_found")
        try:
            params = body.to_sampling_params()
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        # here, before anything is sent (a negative or huge id does not even fit the instance wire);
        # against the tokenizer, as token-id prompts are; the engine checks its vocab_size too
        try:
            check_stop_token_ids(params.stop_token_ids, len(self._engine.tokenizer))
        except RequestRejectedError as exc:
            raise ApiError(400, str(exc), param="stop_token_ids") from None
        return params

    async def _respond(self, request: Request, body, params: SamplingParams,
                       prompt_ids_list: list[list[int]], prompt_name: str, fmt,
                       meta: ResponseMeta, arrival_s: float) -> Response:
        max_model_len = self._engine.model_info.max_model_len
        try:
            prompts = [(ids, fit_to_context(params, len(ids), max_model_len, prompt_name))
                       for ids in prompt_ids_list]
        except ValueError as exc:  # e.g. min_tokens above the max_tokens the context leaves
            raise ApiError(400, str(exc)) from None
        sub_requests = expand_sub_requests(meta.response_id, prompts, body.user or "", body.priority)
        generation = Generation(self._engine, sub_requests, self._metrics, arrival_s, self._drain)
        # the body has been read, so `receive` now only reports a disconnect
        generation.start(request.receive)
        responder = Responder(generation, sub_requests, fmt, meta, prompt_ids_list, params.n)
        if body.stream:
            return await responder.stream_response(request)
        return await responder.json_response()
