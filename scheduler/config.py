"""Scheduler configuration."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 128  # cap on running requests
    max_num_batched_tokens: int = 2048  # token budget per step (prefill chunks + decode tokens)
    enable_chunked_prefill: bool = True
    # "recompute" drops a preempted request's KV and prefills it again later; swapping plugs in here.
    preemption_mode: str = "recompute"

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"--max-num-batched-tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.preemption_mode not in ("recompute",):
            raise ValueError(f"preemption_mode must be 'recompute', got {self.preemption_mode!r}")
