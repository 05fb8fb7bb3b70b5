"""Prompts to token ids, and the context-length check that sets each prompt's max_tokens.

Every failure here is the client's to fix, so each raises a 400 `ApiError` saying what to change.
"""
from __future__ import annotations

import jinja2

from scheduler.sampling_params import SamplingParams
from serving.api.errors import ApiError
from serving.api.protocol import ChatCompletionRequest, CompletionRequest


def completion_prompt_ids(tokenizer, request: CompletionRequest) -> list[list[int]]:
    """Token ids of each prompt: strings are tokenized (with the model's special tokens, e.g. BOS,
    as vLLM does), token-id prompts are checked against the vocabulary."""
    max_token_id = len(tokenizer) - 1
    prompt_ids_list = []
    for prompt in request.prompts():
        if isinstance(prompt, str):
            prompt_ids = list(tokenizer.encode(prompt))
        else:
            prompt_ids = list(prompt)
            bad_ids = [t for t in prompt_ids if not 0 <= t <= max_token_id]
            if bad_ids:
                raise ApiError(400, f"token id {bad_ids[0]} is out of the vocabulary "
                                    f"(valid ids are 0..{max_token_id})", param="prompt")
        if not prompt_ids:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        prompt_ids_list.append(prompt_ids)
    return prompt_ids_list


def chat_prompt_ids(tokenizer, request: ChatCompletionRequest) -> list[int]:
    try:
        messages = request.template_messages()
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages") from None
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except (ValueError, jinja2.TemplateError) as exc:
        # no chat template, or the template refused the conversation (e.g. roles must alternate)
        raise ApiError(400, f"cannot apply the model's chat template: {exc}",
                       param="messages") from None
    if hasattr(encoded, "keys"):  # transformers >= 5 returns a BatchEncoding
        encoded = encoded["input_ids"]
    prompt_ids = list(encoded)
    if not prompt_ids:
        raise ApiError(400, "the chat template produced an empty prompt", param="messages")
    return prompt_ids


def fit_to_context(params: SamplingParams, num_prompt_tokens: int, max_model_len: int,
                   prompt_name: str) -> SamplingParams:
    """`params` with max_tokens set: as requested if prompt + max_tokens fits in the context,
    the remaining context if absent; otherwise a 400 that names the limit and the lengths.

    `prompt_name` is what the client calls its input ("prompt", "messages").
    """
    if num_prompt_tokens >= max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. "
                            f"However, your request has {num_prompt_tokens} input tokens, which "
                            f"leaves no room for output. Please reduce the length of the "
                            f"{prompt_name}.", param=prompt_name)
    if params.max_tokens is None:
        return params.clone(max_tokens=max_model_len - num_prompt_tokens)
    total = num_prompt_tokens + params.max_tokens
    if total > max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. "
                            f"However, you requested {total} tokens ({num_prompt_tokens} in the "
                            f"{prompt_name}, {params.max_tokens} in the completion). Please reduce "
                            f"the length of the {prompt_name} or completion.", param="max_tokens")
    return params
