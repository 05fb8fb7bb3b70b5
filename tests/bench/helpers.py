"""Builders shared by the bench tests."""
from __future__ import annotations

from bench.records import RequestRecord


def make_record(start_s: float = 0.0, ttft_s: float = 0.1, itl_s: list[float] | None = None,
                num_output_tokens: int | None = None, num_prompt_tokens: int = 10, tenant: str = "default",
                success: bool = True, arrival_s: float | None = None) -> RequestRecord:
    """A finished request; e2el is ttft plus the gaps, output tokens one per chunk unless given."""
    itl_s = list(itl_s or [])
    return RequestRecord(
        request_id=f"r{start_s}-{tenant}", tenant=tenant, num_prompt_tokens=num_prompt_tokens,
        num_output_tokens=(len(itl_s) + 1 if num_output_tokens is None else num_output_tokens) if success else 0,
        arrival_s=start_s if arrival_s is None else arrival_s, start_s=start_s, success=success,
        ttft_s=ttft_s if success else 0.0, itl_s=itl_s if success else [],
        e2el_s=(ttft_s + sum(itl_s)) if success else 0.0, error="" if success else "HTTP 500: boom")
