"""Engine logprobs (`TokenLogprob`) in OpenAI's two shapes.

Completions (legacy):  {"tokens": [...], "token_logprobs": [...],
                        "top_logprobs": [{token: logprob, ...}, ...], "text_offset": [...]}
Chat:                  {"content": [{"token", "logprob", "bytes",
                                     "top_logprobs": [{"token", "logprob", "bytes"}, ...]}, ...]}
"""
from __future__ import annotations

from serving.engine.protocol import TokenLogprob

# JSON has no -inf; OpenAI clients expect a finite number (vLLM clamps the same way)
_MIN_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)


class TokenTexts:
    """The text of single tokens, as logprobs show them; cached because top-k repeats tokens.

    The cache is bounded by the vocabulary size.
    """

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._texts[token_id] = text
        return text


def completion_logprobs(texts: TokenTexts, logprobs: list[TokenLogprob], num_top: int,
                        first_text_offset: int) -> dict:
    """`first_text_offset`: characters of this choice's text already sent (streams continue it)."""
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offsets: list[int] = []
    offset = first_text_offset
    for entry in logprobs:
        token = texts.text(entry.token_id)
        tokens.append(token)
        token_logprobs.append(_finite(entry.logprob))
        top = {texts.text(token_id): _finite(lp) for token_id, lp in entry.top[:num_top]}
        # OpenAI always includes the sampled token, so there are up to num_top + 1 entries
        top.setdefault(token, _finite(entry.logprob))
        top_logprobs.append(top)
        text_offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offsets}


def _chat_token(texts: TokenTexts, token_id: int, logprob: float) -> dict:
    token = texts.text(token_id)
    return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8"))}


def chat_logprobs(texts: TokenTexts, logprobs: list[TokenLogprob], num_top: int) -> dict:
    content = []
    for entry in logprobs:
        item = _chat_token(texts, entry.token_id, entry.logprob)
        item["top_logprobs"] = [_chat_token(texts, token_id, lp)
                                for token_id, lp in entry.top[:num_top]]
        content.append(item)
    return {"content": content}
