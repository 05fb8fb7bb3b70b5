"""Helpers shared by the disaggregation tests (this module holds no tests).

A deployment's client belongs to one event loop (its gRPC channels do), so each deployment gets a
`LoopThread` that runs its loop, and tests hand coroutines to it. References come from a colocated
engine stepped in the test process through the output processor: its RequestOutputs are what AsyncLLM
would stream.
"""
from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from dataclasses import dataclass

from scheduler.request import RequestStatus
from scheduler.sampling_params import SamplingParams
from serving.config import Config
from serving.engine.engine import build_engine
from serving.engine.output_processor import OutputProcessor
from serving.engine.protocol import RequestOutput

KV_BUDGET = "8MiB"  # 256 blocks of 16 tokens of the tiny model: small, and plenty for these tests
CALL_TIMEOUT_S = 240.0


def tiny_config(model_dir: str, **changes) -> Config:
    return Config.from_dict({"model": model_dir, "kv_cache_memory_bytes": KV_BUDGET, "log_level": "warning",
                             "num_cpus_per_instance": 1, **changes})


class LoopThread:
    """An event loop on a daemon thread; run(coro) waits (bounded) for its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()

    def run(self, coro, timeout_s: float = CALL_TIMEOUT_S):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass(frozen=True)
class Case:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


def greedy(max_tokens: int, **changes) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **changes)


def make_prompts(seed: int, lengths: list[int], vocab_size: int = 2048) -> list[list[int]]:
    """Distinct random prompts (ids above the special tokens), one per length."""
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab_size) for _ in range(n)] for n in lengths]


def make_cases(prefix: str, seed: int, lengths: list[int], max_tokens: list[int]) -> list[Case]:
    prompts = make_prompts(seed, lengths)
    return [Case(f"{prefix}-{i}", p, greedy(max_tokens[i % len(max_tokens)])) for i, p in enumerate(prompts)]


def reference_outputs(config: Config, cases: list[Case]) -> dict[str, list[RequestOutput]]:
    """Every case through one colocated engine, batched together."""
    from transformers import AutoTokenizer
    engine = build_engine(config)
    processor = OutputProcessor(AutoTokenizer.from_pretrained(engine.model_dir))
    outputs: dict[str, list[RequestOutput]] = {c.request_id: [] for c in cases}
    for case in cases:
        engine.add_request(case.request_id, case.prompt_token_ids, case.params)
        processor.add_request(case.request_id, case.prompt_token_ids, case.params)
    while engine.has_unfinished():
        client_outputs, stopped = processor.process(engine.step())
        for state in stopped:
            engine.abort_requests([state.request_id], RequestStatus.FINISHED_STOPPED, state.stop_hit)
        for output in client_outputs:
            outputs[output.request_id].append(output)
    engine.close()
    return outputs


def assert_none_ended(tasks: list[asyncio.Task], deadline: float) -> None:
    """While waiting for a moment in the middle of the streams: none of them has ended yet (saying which
    ended, and how), and the deadline (time.monotonic) has not passed."""
    ended = [task.exception() or "finished" for task in tasks if task.done()]
    assert not ended, f"{len(ended)} stream(s) ended too early: {ended}"
    assert time.monotonic() < deadline, "timed out waiting for the streams to get there"


async def collect(client, case: Case) -> list[RequestOutput]:
    return [o async for o in client.generate(case.request_id, case.prompt_token_ids, case.params)]


async def collect_all(client, cases: list[Case]) -> dict[str, list[RequestOutput] | BaseException]:
    """All cases at once; a case that raised maps to its exception."""
    results = await asyncio.gather(*(collect(client, c) for c in cases), return_exceptions=True)
    return {c.request_id: r for c, r in zip(cases, results)}


def comparable(outputs: list[RequestOutput]) -> list[tuple]:
    """What must match AsyncLLM's stream output for output (timings and cache hits aside)."""
    return [(o.new_token_ids, o.new_text, o.finished, o.finish_reason, o.stop_reason, o.num_prompt_tokens,
             o.num_output_tokens, [lp.token_id for lp in o.new_logprobs] if o.new_logprobs else None)
            for o in outputs]


def token_ids(outputs: list[RequestOutput]) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


async def wait_until_drained(client, timeout_s: float = 60.0) -> dict:
    """Every up instance's integrity reply once nothing is held any more (leases end
    asynchronously, after the decode side acknowledges), or the last replies at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        replies = await client.check_integrity()
        drained = all(r.num_requests == 0 and r.num_leased == 0 and r.num_free_blocks == r.num_total_blocks
                      for r in replies.values())
        if drained or time.monotonic() > deadline:
            return replies
        await asyncio.sleep(0.1)


def assert_no_leaks(replies: dict) -> None:
    for name, reply in replies.items():
        assert reply.ok, f"{name}: {reply.error}"
        assert reply.num_requests == 0 and reply.num_leased == 0, f"{name} still holds requests: {reply}"
        assert reply.num_free_blocks == reply.num_total_blocks, f"{name} leaked blocks: {reply}"


def children_running(parent_pid: int, module: bytes) -> list[int]:
    """Live processes whose parent is parent_pid and whose command line names `module`."""
    children = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, parent = f.read().rsplit(")", 1)[1].split()[:2]
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read()
        except (OSError, ValueError):
            continue
        if int(parent) == parent_pid and state != "Z" and module in command:
            children.append(int(entry))
    return children


def instance_children(parent_pid: int) -> list[int]:
    """Live instance processes (`serving.instance.main`) whose parent is parent_pid."""
    return children_running(parent_pid, b"serving.instance.main")
