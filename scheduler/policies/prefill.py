"""Prefill shaping: how many of a request's pending tokens run this step, and through which layers.

`ChunkedPrefill` (Sarathi-style, every peer's default): a prompt longer than the step's token budget
runs in chunks over several steps, every chunk through all layers, beside the decode rows. With
chunking off, a prompt runs whole or waits. Layered prefill (a prompt advancing one layer group per
step while decodes run every step) implements the same interface and emits several segments.
"""
from __future__ import annotations

from typing import Protocol

from scheduler.request import Request
from scheduler.step import Segment, StepPlan


class PrefillShaping(Protocol):
    def check(self, request: Request, budget: int) -> str | None:
        """Why the request can never be scheduled under this policy (None: it can)."""

    def num_tokens(self, num_pending: int, budget: int) -> int:
        """Tokens to schedule of num_pending with `budget` left this step; 0: not this step."""

    def segments(self, plan: StepPlan) -> list[Segment]:
        """The plan's segments, once its tokens are chosen."""


class ChunkedPrefill:
    def __init__(self, enable_chunking: bool = True) -> None:
        self.enable_chunking = enable_chunking

    def check(self, request: Request, budget: int) -> str | None:
        if not self.enable_chunking and request.num_prompt_tokens > budget:
            return (f"the prompt has {request.num_prompt_tokens} tokens, more than --max-num-batched-tokens "
                    f"({budget}) with chunked prefill off")
        return None

    def num_tokens(self, num_pending: int, budget: int) -> int:
        if num_pending <= budget:
            return num_pending
        return budget if self.enable_chunking else 0

    def segments(self, plan: StepPlan) -> list[Segment]:
        return [Segment(list(plan.num_scheduled_tokens))] if plan.num_scheduled_tokens else []


def make_prefill_shaping(enable_chunked_prefill: bool) -> PrefillShaping:
    return ChunkedPrefill(enable_chunked_prefill)
