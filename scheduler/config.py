"""Scheduler configuration."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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
    # --scheduling-policy vtc (scheduler/policies/fairness.py, docs/fairness.md): a client's counter grows
    # by prompt tokens x prefill weight + output tokens x decode weight, over the client's weight
    fairness_prefill_weight: float = 1.0
    fairness_decode_weight: float = 2.0
    fairness_update_interval: int = 1  # steps between re-rankings of the queue by the counters
    # a waiting request preempts a running one whose client is this far ahead (weighted tokens);
    # None: 2 x the dearer weight x max_model_len (the per-request term of VTC's bound); 0: never
    fairness_preemption_threshold: float | None = None
    # ((client, weight), ...), sorted; YAML may give a mapping {alice: 2}, the CLI alice:2,bob:1.
    # Clients not named weigh 1; weight 2 gets twice the service of weight 1
    client_weights: tuple[tuple[str, float], ...] = ()

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
        self._check_fairness()

    def _check_fairness(self) -> None:
        # the one normalization: YAML, the CLI and a JSON round trip give mappings, strings or lists
        object.__setattr__(self, "client_weights", parse_client_weights(self.client_weights))
        for name in ("fairness_prefill_weight", "fairness_decode_weight"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a number of at least 0, got {value!r}")
        if self.fairness_prefill_weight == 0 and self.fairness_decode_weight == 0:
            raise ValueError("--fairness-prefill-weight and --fairness-decode-weight are both 0: VTC would count "
                             "no service at all; make at least one positive (defaults 1 and 2)")
        interval = self.fairness_update_interval
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ValueError(f"--fairness-update-interval must be a whole number of steps, at least 1, got "
                             f"{interval!r}")
        threshold = self.fairness_preemption_threshold
        if threshold is not None and (not _is_number(threshold) or not math.isfinite(threshold) or threshold < 0):
            raise ValueError(f"--fairness-preemption-threshold must be a number of weighted tokens, at least 0 "
                             f"(0: never preempt for fairness), or left out for the default; got {threshold!r}")


def parse_client_weights(value: Any) -> tuple[tuple[str, float], ...]:
    """`alice:2,bob:1`, a mapping {alice: 2}, or (client, weight) pairs -> ((client, weight), ...) sorted
    by client. A ValueError says what to write."""
    example = "e.g. --client-weights alice:2,bob:1, or client_weights: {alice: 2, bob: 1} in YAML"
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        pairs = []
        for item in value.split(","):
            name, sep, weight = item.strip().rpartition(":")  # the last colon: client names may hold one
            if not sep or not name:
                raise ValueError(f"--client-weights: {item.strip()!r} needs a client and a weight; {example}")
            pairs.append((name, weight))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        try:
            pairs = [tuple(pair) for pair in value]
        except TypeError:
            raise ValueError(f"--client-weights must be client:weight pairs, got {value!r}; {example}") from None
    weights: dict[str, float] = {}
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"--client-weights: {pair!r} is not a (client, weight) pair; {example}")
        name, weight = str(pair[0]), pair[1]
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"--client-weights: the weight of {name!r} is {weight!r}, not a number; "
                             f"{example}") from None
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"--client-weights: the weight of {name!r} must be positive, got {weight!r}")
        if name in weights:
            raise ValueError(f"--client-weights: {name!r} is given twice; give each client once")
        weights[name] = weight
    return tuple(sorted(weights.items()))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
