"""Where a plan breaks: for each request that missed an SLO at a rate the plan cannot sustain, the
part of its life that took longest, counted over the missed requests.

    TTFT missed   decode memory     waiting at the router for a decode instance with free blocks
                  prefill queue     waiting for the prefill instance (or replica) to schedule it
                  prefill compute   its own prefill steps (a prompt too long for the plan's speed)
    TPOT missed   decode memory     it was preempted (the decode pool ran out of blocks)
                  transfer          its KV arriving after the first token (link too slow or busy),
                                    when that wait is at least half the time beyond the SLO
                  decode queue      likewise, waiting for a place in the decode batch after its KV
                  decode compute    otherwise: decode steps too slow for the TPOT SLO (batch too large) — on a
                                    colocated replica: prefill interference, decode rows sharing steps
                                    with prompt chunks
    failed        the error (no decode room within the timeout counts as decode memory)
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from scheduler.simulator.spec import SimRecord


@dataclass
class Attribution:
    bottleneck: str  # the most frequent cause, or "none"
    shares: dict[str, float] = field(default_factory=dict)  # cause -> share of the missed requests
    num_missed: int = 0
    num_requests: int = 0

    def describe(self) -> str:
        if not self.num_missed:
            return "no request missed its SLOs"
        parts = ", ".join(f"{cause} {100 * share:.0f}%" for cause, share in self.shares.items())
        return f"{self.bottleneck} ({parts} of {self.num_missed} missed requests)"


def attribute(records: list[SimRecord], ttft_slo_s: float | None, tpot_slo_s: float | None,
              colocated: bool) -> Attribution:
    causes: Counter[str] = Counter()
    for record in records:
        cause = _cause(record, ttft_slo_s, tpot_slo_s, colocated)
        if cause is not None:
            causes[cause] += 1
    missed = sum(causes.values())
    if not missed:
        return Attribution("none", {}, 0, len(records))
    shares = {cause: count / missed for cause, count in causes.most_common()}
    return Attribution(next(iter(shares)), shares, missed, len(records))


def _cause(record: SimRecord, ttft_slo_s: float | None, tpot_slo_s: float | None, colocated: bool) -> str | None:
    if not record.success:
        return "decode memory" if "decode instance could take" in record.error else f"error: {record.error[:60]}"
    first = record.token_times_s[0]
    ttft = first - record.start_s
    n = record.num_output_tokens
    tpot = (record.token_times_s[-1] - first) / (n - 1) if n > 1 else 0.0
    if ttft_slo_s is not None and ttft > ttft_slo_s:
        reserved = record.reserved_s if record.reserved_s is not None else record.start_s
        scheduled = record.prefill_scheduled_s if record.prefill_scheduled_s is not None else reserved
        parts = {"decode memory": reserved - record.start_s, "prefill queue": scheduled - reserved,
                 "prefill compute": first - scheduled}
        return max(parts, key=parts.get)
    if tpot_slo_s is not None and tpot > tpot_slo_s:
        if record.num_preemptions:
            return "decode memory"
        if colocated:
            return "decode compute (prefill interference)"
        # the time beyond what the SLO allows, and which wait (if any) accounts for most of it
        excess = (tpot - tpot_slo_s) * (n - 1)
        arrived = record.kv_arrived_s if record.kv_arrived_s is not None else first
        scheduled = record.decode_scheduled_s if record.decode_scheduled_s is not None else arrived
        waits = {"transfer": arrived - first, "decode queue": scheduled - arrived}
        cause = max(waits, key=waits.get)
        return cause if waits[cause] >= excess / 2 else "decode compute"
    return None
