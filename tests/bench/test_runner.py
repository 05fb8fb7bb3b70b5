"""The runner's logic (turn order and history, the concurrency cap, failures) over httpx.MockTransport,
which answers in-process with canned SSE bytes: no server and no socket are involved."""
import asyncio
import json
import math

import httpx

from bench.config import EndpointConfig, LoadConfig
from bench.datasets import Conversation, Turn, Workload
from bench.runner import RunSpec, run_benchmark

CHAT = EndpointConfig(base_url="http://127.0.0.1:1", endpoint="/v1/chat/completions")


def _sse_reply(text: str, prompt_tokens: int, completion_tokens: int, chat: bool = True) -> httpx.Response:
    token = {"delta": {"content": text}} if chat else {"text": text}
    close = {"delta": {}} if chat else {"text": ""}
    chunks = [{"choices": [{"index": 0, **token, "finish_reason": None}]},
              {"choices": [{"index": 0, **close, "finish_reason": "length"}]},
              {"choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                        "completion_tokens": completion_tokens}}]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})


def _workload(num_conversations: int, num_turns: int, tenant: str = "default") -> Workload:
    conversations = [Conversation(c, [Turn(f"q{c}.{t}", 5, 3) for t in range(num_turns)], tenant=tenant)
                     for c in range(num_conversations)]
    return Workload(conversations, {tenant: 1.0})


def _spec(endpoint=CHAT, **load) -> RunSpec:
    return RunSpec(endpoint, "m", LoadConfig(**load), {"ttft": 1000.0}, show_progress=False)


def test_turns_carry_history_in_order():
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        last = body["messages"][-1]["content"]
        return _sse_reply(f"answer to {last}", prompt_tokens=10 * len(body["messages"]), completion_tokens=3)

    run = run_benchmark(_spec(), _workload(2, 3, tenant="alice"), transport=httpx.MockTransport(handler))
    assert [(r.conversation_id, r.turn_index) for r in run.records] == [(c, t) for c in (0, 1) for t in range(3)]
    assert all(r.success for r in run.records) and run.metrics.slo_attainment == 1.0
    third = next(b for b in bodies if b["messages"][-1]["content"] == "q1.2")
    assert third["messages"] == [
        {"role": "user", "content": "q1.0"}, {"role": "assistant", "content": "answer to q1.0"},
        {"role": "user", "content": "q1.1"}, {"role": "assistant", "content": "answer to q1.1"},
        {"role": "user", "content": "q1.2"}]
    assert all(b["user"] == "alice" and b["max_tokens"] == 3 for b in bodies)
    assert [r.num_prompt_tokens for r in run.records[:3]] == [10, 30, 50]  # from the server's usage


def test_completions_history_is_concatenated_text():
    prompts = []

    def handler(request: httpx.Request) -> httpx.Response:
        prompts.append(json.loads(request.content)["prompt"])
        return _sse_reply("R", 1, 1, chat=False)

    run_benchmark(_spec(EndpointConfig(base_url="http://127.0.0.1:1")), _workload(1, 2),
                  transport=httpx.MockTransport(handler))
    assert prompts == ["q0.0", "q0.0\n\nR\n\nq0.1"]


def test_max_concurrency_caps_requests_in_flight():
    in_flight = {"now": 0, "peak": 0}

    async def handler(request: httpx.Request) -> httpx.Response:
        in_flight["now"] += 1
        in_flight["peak"] = max(in_flight["peak"], in_flight["now"])
        await asyncio.sleep(0.02)
        in_flight["now"] -= 1
        return _sse_reply("x", 5, 1)

    run = run_benchmark(_spec(request_rate=math.inf, max_concurrency=2), _workload(6, 1),
                        transport=httpx.MockTransport(handler))
    assert in_flight["peak"] == 2
    assert len(run.records) == 6 and run.metrics.completed == 6
    assert sum(r.queue_s > 0.01 for r in run.records) >= 2  # all arrived at 0; later ones waited


def test_a_failed_turn_ends_its_conversation_only():
    def handler(request: httpx.Request) -> httpx.Response:
        messages = json.loads(request.content)["messages"]
        if messages[-1]["content"] == "q0.1":
            return httpx.Response(503, json={"error": {"message": "overloaded"}})
        return _sse_reply("ok", 5, 2)

    run = run_benchmark(_spec(), _workload(2, 3), transport=httpx.MockTransport(handler))
    status = {(r.conversation_id, r.turn_index): (r.success, r.error) for r in run.records}
    assert status[(0, 0)] == (True, "")
    assert status[(0, 1)] == (False, "HTTP 503: overloaded")
    assert status[(0, 2)] == (False, "not sent: turn 1 of this conversation failed")
    assert all(status[(1, t)][0] for t in range(3))
    assert run.metrics.failed == 2 and run.metrics.slo_attainment == 4 / 6
