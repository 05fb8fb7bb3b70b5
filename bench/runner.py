"""One benchmark run: a workload sent to one endpoint at one arrival process, measured.

Conversations arrive by the arrival process; the turns of one conversation go one after another,
each after the previous reply (plus the think time) and carrying the history, as a chat user would.
`--max-concurrency` caps requests in flight; time spent waiting for a slot is reported as queue time
and is not part of TTFT, as in `vllm bench serve`.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import httpx
import numpy as np
from tqdm import tqdm

from bench.arrivals import arrival_times
from bench.client import StreamingClient, build_payload
from bench.config import EndpointConfig, LoadConfig
from bench.datasets import DEFAULT_TENANT, Conversation, Turn, Workload
from bench.metrics import BenchmarkMetrics, compute_metrics
from bench.records import RequestRecord

_READY_CHECK_MAX_TOKENS = 2
_ARRIVAL_SEED_OFFSET = 1  # arrivals draw from their own stream so lengths stay put when rates change


@dataclass(frozen=True)
class RunSpec:
    endpoint: EndpointConfig
    model: str  # served model name
    load: LoadConfig
    slos_ms: dict[str, float]
    percentiles: tuple[float, ...] = (90.0, 99.0)
    seed: int = 0
    show_progress: bool = True


@dataclass
class RunResult:
    spec: RunSpec
    records: list[RequestRecord]
    duration_s: float
    metrics: BenchmarkMetrics
    started_at: float | None = None  # wall clock (seconds since the epoch) when the run began; None: simulated


def run_benchmark(spec: RunSpec, workload: Workload, count_tokens: Callable[[str], int] | None = None,
                  transport: httpx.AsyncBaseTransport | None = None) -> RunResult:
    """Send the whole workload and measure it (blocking; runs its own event loop). `transport`
    replaces the network (tests use httpx.MockTransport)."""
    rng = np.random.default_rng([spec.seed, _ARRIVAL_SEED_OFFSET])
    arrivals_s = arrival_times(spec.load, len(workload.conversations), rng, workload.trace_times_s)
    records, duration_s, started_at = asyncio.run(_run(spec, workload, arrivals_s, count_tokens, transport))
    metrics = compute_metrics(records, duration_s, list(spec.percentiles), spec.slos_ms,
                              workload.tenant_weights)
    return RunResult(spec, records, duration_s, metrics, started_at)


def check_ready(endpoint: EndpointConfig, model: str, workload: Workload) -> None:
    """Send one short request first so a wrong URL, model or endpoint fails fast and clearly."""
    first = workload.conversations[0]
    payload = build_payload(endpoint, model, prompt_for(endpoint, [], first.turns[0]),
                            _READY_CHECK_MAX_TOKENS, None)
    record = RequestRecord(request_id=f"bench-ready-{uuid.uuid4().hex[:8]}")

    async def send_one() -> None:
        async with StreamingClient(endpoint) as client:
            await client.send(payload, record, time.perf_counter())

    asyncio.run(send_one())
    if not record.success:
        raise RuntimeError(f"the first test request to {endpoint.url} (model {model!r}) failed: "
                           f"{record.error}. Check --base-url, --endpoint, --model and --api-key.")


def prompt_for(endpoint: EndpointConfig, history: list[dict[str, str]],
               turn: Turn) -> str | list[int] | list[dict[str, str]]:
    """Chat: the message list. Completions: the history's texts and the new prompt, concatenated."""
    if endpoint.is_chat:
        if not isinstance(turn.prompt, str):
            raise ValueError("token-id prompts only work with /v1/completions; use --prompt-format text")
        return history + [{"role": "user", "content": turn.prompt}]
    if not history:
        return turn.prompt
    return "\n\n".join([m["content"] for m in history] + [str(turn.prompt)])


async def _run(spec: RunSpec, workload: Workload, arrivals_s: np.ndarray,
               count_tokens: Callable[[str], int] | None,
               transport: httpx.AsyncBaseTransport | None) -> tuple[list[RequestRecord], float, float]:
    """The records, the run's duration and its wall-clock start (the instant the records' times count
    from: arrival_s + started_at is an arrival's time.time(), as in step traces)."""
    records: list[RequestRecord] = []
    slots = (asyncio.Semaphore(spec.load.max_concurrency) if spec.load.max_concurrency
             else contextlib.nullcontext())
    run_id = uuid.uuid4().hex[:8]
    progress = tqdm(total=workload.num_requests, disable=not spec.show_progress, unit="req",
                    desc=f"rate {spec.load.request_rate:g}/s", dynamic_ncols=True)
    try:
        async with StreamingClient(spec.endpoint, count_tokens, transport) as client:
            origin_s, started_at = time.perf_counter(), time.time()

            async def converse(conversation: Conversation, arrival_s: float) -> None:
                await asyncio.sleep(max(0.0, origin_s + arrival_s - time.perf_counter()))
                history: list[dict[str, str]] = []
                num_history_tokens = 0
                for index, turn in enumerate(conversation.turns):
                    if index and workload.think_time_s:
                        await asyncio.sleep(workload.think_time_s)
                    record = RequestRecord(
                        request_id=f"bench-{run_id}-{conversation.conversation_id}-{index}",
                        tenant=conversation.tenant, conversation_id=conversation.conversation_id,
                        turn_index=index, num_prompt_tokens=num_history_tokens + turn.num_input_tokens,
                        max_output_tokens=turn.num_output_tokens,
                        arrival_s=time.perf_counter() - origin_s)
                    tenant = conversation.tenant if conversation.tenant != DEFAULT_TENANT else None
                    payload = build_payload(spec.endpoint, spec.model,
                                            prompt_for(spec.endpoint, history, turn),
                                            turn.num_output_tokens, tenant, turn.priority)
                    async with slots:
                        await client.send(payload, record, origin_s)
                    records.append(record)
                    progress.update(1)
                    if not record.success:
                        _skip_rest(conversation, index, record, records, progress)
                        return
                    history += [{"role": "user", "content": str(turn.prompt)},
                                {"role": "assistant", "content": record.generated_text}]
                    num_history_tokens = record.num_prompt_tokens + record.num_output_tokens

            await asyncio.gather(*(converse(c, float(t))
                                   for c, t in zip(workload.conversations, arrivals_s)))
            duration_s = time.perf_counter() - origin_s
    finally:
        progress.close()
    records.sort(key=lambda r: (r.conversation_id, r.turn_index))
    return records, duration_s, started_at


def _skip_rest(conversation: Conversation, failed_index: int, failed: RequestRecord,
               records: list[RequestRecord], progress: tqdm) -> None:
    """Later turns of a conversation whose turn failed are never sent; they count as failures."""
    for index in range(failed_index + 1, len(conversation.turns)):
        records.append(RequestRecord(
            request_id=f"{failed.request_id.rsplit('-', 1)[0]}-{index}", tenant=conversation.tenant,
            conversation_id=conversation.conversation_id, turn_index=index,
            max_output_tokens=conversation.turns[index].num_output_tokens,
            arrival_s=failed.start_s + failed.e2el_s,
            error=f"not sent: turn {failed_index} of this conversation failed"))
        progress.update(1)
