"""Workloads: the conversations a benchmark sends, built once per seed and reused for every rate and
every system so that all of them serve exactly the same requests.

A single-turn request is a conversation of one turn. Later turns of a conversation are sent after the
previous reply has arrived (see runner.py), carrying the history.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bench.config import SYNTHETIC_DATASETS, WorkloadConfig
from bench.conversations import DEFAULT_TENANT, Conversation, Turn, make_turn
from bench.lengths import WORKLOAD_SHAPES, uniform_lengths
from bench.prompts import PromptSynthesizer

__all__ = ["DEFAULT_TENANT", "Conversation", "Turn", "make_turn", "Workload", "build_workload"]

@dataclass
class Workload:
    conversations: list[Conversation]
    tenant_weights: dict[str, float] = field(default_factory=dict)
    num_dropped: int = 0  # conversations that did not fit in --max-model-len
    think_time_s: float = 0.0  # pause between a reply and the next turn of its conversation

    @property
    def num_requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)

    @property
    def trace_times_s(self) -> list[float | None]:
        return [c.timestamp_s for c in self.conversations]


def build_workload(config: WorkloadConfig, synthesizer: PromptSynthesizer) -> Workload:
    """Build the conversations named by `config`; deterministic in config.seed."""
    length_rng, prompt_rng, tenant_rng, priority_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(4))
    if config.dataset_name in ("jsonl", "sharegpt"):
        from bench.dataset_files import load_jsonl, load_sharegpt

        loader = load_jsonl if config.dataset_name == "jsonl" else load_sharegpt
        conversations = loader(config, synthesizer, prompt_rng)
    else:
        conversations = synthetic_conversations(config, synthesizer, length_rng, prompt_rng)
    kept = [c for c in conversations if trim_to_context(c, config.max_model_len)]
    weights = dict(config.tenants)
    assign_tenants(kept, config.tenants, tenant_rng)
    if config.priority_levels:
        for conversation in kept:
            for turn in conversation.turns:
                turn.priority = int(priority_rng.integers(config.priority_levels))
    for conversation in kept:
        weights.setdefault(conversation.tenant, 1.0)
    if not kept:
        raise ValueError(f"no request of the {config.dataset_name} dataset fits --max-model-len "
                         f"{config.max_model_len}; raise it or shorten the prompts")
    return Workload(kept, weights, num_dropped=len(conversations) - len(kept),
                    think_time_s=config.think_time_s)


def synthetic_lengths(config: WorkloadConfig, rng: np.random.Generator,
                      num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(input lengths, output lengths) for the random and synthetic datasets, each [num_samples]."""
    if config.dataset_name in SYNTHETIC_DATASETS:
        shape = WORKLOAD_SHAPES[config.dataset_name]
        input_lens = shape.input_len.sample(rng, num_samples)
        output_lens = shape.output_len.sample(rng, num_samples)
    else:
        input_lens = uniform_lengths(rng, num_samples, config.random_input_len, config.random_range_ratio)
        output_lens = uniform_lengths(rng, num_samples, config.random_output_len,
                                      config.random_range_ratio)
    if config.output_len is not None:
        output_lens = np.full(num_samples, config.output_len, dtype=np.int64)
    if config.max_model_len is not None:
        # per turn: keep the output, shorten the prompt so that one turn alone fits
        output_lens = np.minimum(output_lens, config.max_model_len - 1)
        input_lens = np.maximum(1, np.minimum(input_lens, config.max_model_len - output_lens))
    return input_lens, output_lens


def synthetic_conversations(config: WorkloadConfig, synthesizer: PromptSynthesizer,
                            length_rng: np.random.Generator,
                            prompt_rng: np.random.Generator) -> list[Conversation]:
    num_samples = config.num_prompts * config.num_turns
    input_lens, output_lens = synthetic_lengths(config, length_rng, num_samples)
    conversations: list[Conversation] = []
    for conv_id in range(config.num_prompts):
        turns = []
        for sample in range(conv_id * config.num_turns, (conv_id + 1) * config.num_turns):
            turns.append(make_turn(synthesizer, config.prompt_format, int(input_lens[sample]),
                                   int(output_lens[sample]), prompt_rng))
        conversations.append(Conversation(conv_id, turns))
    return conversations


def trim_to_context(conversation: Conversation, max_model_len: int | None) -> bool:
    """Drop the turns from the first one whose history would overflow the context (mutates
    `conversation.turns`); False when not even the first turn fits."""
    if max_model_len is None:
        return True
    context = 0
    for index, turn in enumerate(conversation.turns):
        context += turn.num_input_tokens + turn.num_output_tokens
        if context > max_model_len:
            del conversation.turns[index:]
            break
    return bool(conversation.turns)


def assign_tenants(conversations: list[Conversation], tenants: tuple[tuple[str, float], ...],
                   rng: np.random.Generator) -> None:
    """Give each conversation without a tenant one drawn with the given weights (mutates them)."""
    if not tenants:
        return
    names = [name for name, _ in tenants]
    weights = np.asarray([weight for _, weight in tenants], dtype=np.float64)
    draws = rng.choice(len(names), size=len(conversations), p=weights / weights.sum())
    for conversation, draw in zip(conversations, draws):
        if conversation.tenant == DEFAULT_TENANT:
            conversation.tenant = names[draw]
