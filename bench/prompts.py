"""Prompts of a requested token length.

With the model's tokenizer, prompts are random sequences of whole-word tokens, decoded to text and
re-tokenized until the count is right (random words keep every prompt distinct, so a prefix cache
cannot make one request look cheaper than another). Without a tokenizer, prompts are common English
words at about one token each; the server's reported usage then gives the true counts.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

# Whole-word vocabulary entries: an optional word-start marker (byte-level "Ġ" or SentencePiece "▁")
# and letters only, so the decoded text re-tokenizes to the same pieces almost always.
_WORD_TOKEN = re.compile(r"^[\u0120\u2581]?[A-Za-z]{2,}$")
_MIN_WORD_TOKENS = 64
_NUM_FIX_ROUNDS = 4
_FALLBACK_WORDS = tuple((
    "the of and to in is you that it he was for on are as with his they at be this have from or one "
    "had by word but not what all were we when your can said there use an each which she do how their "
    "if will up other about out many then them these so some her would make like him into time has look "
    "two more write go see number no way could people my than first water been call who oil its now find "
    "long down day did get come made may part").split())


def _is_plain_text(text: str) -> bool:
    return text.isascii() and text.isprintable() and any(c.isalpha() for c in text)


def load_tokenizer(name_or_path: str) -> Any:
    """A transformers tokenizer from a model directory (or a name in the local Hugging Face cache)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:  # transformers raises several types for a missing or broken directory
        hint = "" if Path(name_or_path).is_dir() else " (it is not a local directory)"
        raise ValueError(f"cannot load a tokenizer from {name_or_path!r}{hint}: {exc}; pass --tokenizer "
                         "DIR with the model's tokenizer files, or --tokenizer none") from exc


class PromptSynthesizer:
    """Makes prompt text or token ids of a given length; `tokenizer` None means approximate words."""

    def __init__(self, tokenizer: Any | None = None):
        self.tokenizer = tokenizer
        self._word_ids = self._word_token_ids(tokenizer) if tokenizer is not None else None

    @staticmethod
    def _word_token_ids(tokenizer: Any) -> np.ndarray:
        vocab_size = len(tokenizer)
        special = set(tokenizer.all_special_ids)
        pieces = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
        word_ids = [i for i, piece in enumerate(pieces)
                    if i not in special and piece is not None and _WORD_TOKEN.match(piece)]
        if len(word_ids) < _MIN_WORD_TOKENS:
            # a small or unusual vocabulary: any token that decodes to printable ASCII with a letter
            # (single bytes of multi-byte characters would decode to replacement characters)
            word_ids = [i for i in range(vocab_size) if i not in special
                        and _is_plain_text(tokenizer.decode([i]))]
        if not word_ids:
            raise ValueError("the tokenizer has no token that decodes to plain text; pass another "
                             "--tokenizer, or --tokenizer none")
        return np.asarray(word_ids, dtype=np.int64)

    def count_tokens(self, text: str) -> int:
        """Tokens in `text` without special tokens (words when there is no tokenizer)."""
        if self.tokenizer is None:
            return len(text.split())
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def text(self, num_tokens: int, rng: np.random.Generator) -> tuple[str, int]:
        """Random text of about `num_tokens` tokens; returns (text, its exact token count)."""
        if self.tokenizer is None:
            words = rng.choice(len(_FALLBACK_WORDS), size=num_tokens)
            return " ".join(_FALLBACK_WORDS[i] for i in words), num_tokens
        ids = rng.choice(self._word_ids, size=num_tokens).tolist()
        text = self.tokenizer.decode(ids)
        for _ in range(_NUM_FIX_ROUNDS):
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == num_tokens:
                break
            if len(ids) > num_tokens:
                ids = ids[:num_tokens]
            else:
                ids = ids + rng.choice(self._word_ids, size=num_tokens - len(ids)).tolist()
            text = self.tokenizer.decode(ids)
        return text, self.count_tokens(text)

    def token_ids(self, num_tokens: int, rng: np.random.Generator) -> list[int]:
        """Exactly `num_tokens` ids for a /v1/completions token-id prompt, BOS first when the model
        has one (servers add no special tokens to token-id prompts)."""
        if self.tokenizer is None:
            raise ValueError("--prompt-format token_ids needs a tokenizer: pass --tokenizer DIR")
        bos = self.tokenizer.bos_token_id
        head = [bos] if bos is not None else []
        body = rng.choice(self._word_ids, size=num_tokens - len(head)).tolist()
        return head + body
