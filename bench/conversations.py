"""What a benchmark sends: conversations of turns (a single-turn request is a conversation of one turn).
Shared by the synthetic datasets (datasets.py) and the file loaders (dataset_files.py)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.prompts import PromptSynthesizer

DEFAULT_TENANT = "default"


@dataclass
class Turn:
    prompt: str | list[int]  # user text, or token ids for a /v1/completions token-id prompt
    num_input_tokens: int  # tokens of this turn's new prompt (client-side count, no history)
    num_output_tokens: int  # max_tokens sent with the request
    priority: int | None = None  # sent as the request's `priority` (--priority-levels)


@dataclass
class Conversation:
    conversation_id: int
    turns: list[Turn]
    tenant: str = DEFAULT_TENANT
    timestamp_s: float | None = None  # trace replay: when the first turn arrives

    @property
    def num_context_tokens(self) -> int:
        """Upper bound of the context at the last turn: every prompt and every reply."""
        return sum(t.num_input_tokens + t.num_output_tokens for t in self.turns)


def make_turn(synthesizer: PromptSynthesizer, prompt_format: str, num_input_tokens: int,
              num_output_tokens: int, rng: np.random.Generator) -> Turn:
    if prompt_format == "token_ids":
        return Turn(synthesizer.token_ids(num_input_tokens, rng), num_input_tokens, num_output_tokens)
    text, num_tokens = synthesizer.text(num_input_tokens, rng)
    return Turn(text, num_tokens, num_output_tokens)
