"""The typed step contract between the scheduler and an executor.

The scheduler emits a `StepPlan`; an executor (the model runner, a TP group, the latency model)
executes it and returns a `StepResult`. Nothing else crosses that boundary, and both are plain
picklable dataclasses so they can cross a process boundary as well. The runner keeps its own
per-request state (token ids, block table, sampling state), created from a `NewRequestData` and
advanced by `CachedRequestData` deltas.

Segments say which rows run through which layers. Every request scheduled this step appears in exactly
one chain of segments; a chain that stops before the last layer leaves its hidden state with the
runner (carried), and a later step's segment with the same request ids resumes from there:

    step 1   [A B C] layers [0, L)          decode rows and a prefill chunk, all layers (the default)
    step 2   [A B]   layers [0, L)          decode rows, every step
             [P]     layers [0, 8)          a layered prefill: P's first layer group, carried
    step 3   [A B]   layers [0, L)
             [P]     layers [8, 16)         resumes from P's carried hidden state
    send     [A B C] [0, 4) [4, 8) ...      one chain cut into layer groups so that KV sends
                                            leave while the later layers compute
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scheduler.kv_moves import KVMove, MoveResult
from scheduler.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner has no state for: first scheduled, or resumed after preemption."""
    request_id: str
    token_ids: list[int]  # prompt + outputs so far (a resumed request recomputes its outputs' KV)
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # KV already in the cache (prefix hit), before this step's tokens


@dataclass
class CachedRequestData:
    """Delta for a request the runner already holds."""
    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int  # before this step's tokens
    # tokens the runner did not sample itself (e.g. the first token produced by a remote prefill)
    new_token_ids: list[int] = field(default_factory=list)


@dataclass
class Segment:
    """These requests' scheduled tokens (in plan order) through layers [layer_start, layer_end);
    layer_end None means the model's last layer."""
    request_ids: list[str]
    layer_start: int = 0
    layer_end: int | None = None


@dataclass
class StepPlan:
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    # tokens to compute this step per request, in batch order (new requests first, then cached)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    finished_request_ids: list[str] = field(default_factory=list)  # runner drops their state
    preempted_request_ids: list[str] = field(default_factory=list)  # likewise; resumed as new later
    # in execution order; empty: every scheduled request through every layer, in one pass
    segments: list[Segment] = field(default_factory=list)
    kv_moves: list[KVMove] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        """Nothing to compute (moves may still be there to start or cancel)."""
        return not self.num_scheduled_tokens


def is_decode_row(num_scheduled: int, computed_before: int, num_known_tokens: int) -> bool:
    """A plan row that decodes: one token, the one after everything computed before it (a prompt of one
    token is a prefill). The latency-model executor prices rows by this rule; step traces record by it."""
    return num_scheduled == 1 and computed_before + 1 >= num_known_tokens > 1


@dataclass
class StepResult:
    # one sampled token per request that completed its prompt (or decoded) this step
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    # per request: an opaque logprob record for that token (formatted by the serving layer)
    logprobs: dict[str, Any] = field(default_factory=dict)
    # moves started, finished or failed since the last step (of this plan's moves and earlier ones)
    moves: list[MoveResult] = field(default_factory=list)
    # how long the step took (measured by a runner, modelled by the latency-model executor)
    step_seconds: float = 0.0
    # a pipelined runner's, stage order, or None: rank 0's time submitting the plan (handing it on and
    # stage 0's step; the engine measures the rest of its own time), then how long each later stage's
    # first rank held it (its step, less the wait for the activations)
    stage_seconds: list[float] | None = None
