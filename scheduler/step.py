"""The typed step contract between the scheduler and the model runner.

The scheduler emits a `StepPlan`; the runner executes it and returns a `StepResult`. Nothing else crosses
that boundary, and both are plain picklable dataclasses so they can cross a process boundary as well.
The runner keeps its own per-request state (token ids, block table, sampling state), created from a
`NewRequestData` and advanced by `CachedRequestData` deltas.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
class KVSend:
    """Send the prompt KV of a request whose prefill completes this step, layer group by layer group
    as the forward pass produces them."""
    request_id: str
    block_ids: list[int]
    num_tokens: int
    peer: str  # the decode instance's KV-transfer address


@dataclass
class StepPlan:
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    # tokens to compute this step per request, in batch order (new requests first, then cached)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    finished_request_ids: list[str] = field(default_factory=list)  # runner drops their state
    preempted_request_ids: list[str] = field(default_factory=list)  # likewise; resumed as new later
    kv_sends: list[KVSend] = field(default_factory=list)  # empty when colocated

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


@dataclass
class StepResult:
    # one sampled token per request that completed its prompt (or decoded) this step
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    # per request: an opaque logprob record for that token (formatted by the serving layer)
    logprobs: dict[str, Any] = field(default_factory=dict)
    # KV transfers that ended since the last step: sends acknowledged by the peer (prefill side) or
    # receives complete (decode side), and those that failed for good
    finished_sending: list[str] = field(default_factory=list)
    failed_sending: list[str] = field(default_factory=list)
    finished_recving: list[str] = field(default_factory=list)
    failed_recving: list[str] = field(default_factory=list)
