"""Scheduler configuration."""
from __future__ import annotations

from dataclasses import dataclass

from scheduler.policies.ordering import SCHEDULING_POLICIES
from scheduler.policies.preemption import PREEMPTION_MODES


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 128  # cap on running requests
    max_num_batched_tokens: int = 2048  # token budget per step (prefill chunks + decode tokens)
    enable_chunked_prefill: bool = True
    # order of waiting requests and choice of preemption victims (vLLM's --scheduling-policy)
    scheduling_policy: str = "fcfs"
    # what a preempted request's KV becomes ("recompute": dropped, prefilled again when resumed)
    preemption_mode: str = "recompute"

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"--max-num-batched-tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"--scheduling-policy must be one of {', '.join(SCHEDULING_POLICIES)}, got "
                             f"{self.scheduling_policy!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"--preemption-mode must be one of {', '.join(PREEMPTION_MODES)}, got "
                             f"{self.preemption_mode!r}")
