"""The real server process (`pdserve serve` on the tiny model) against the official openai client.

No fake engine here: the fixture builds the tiny model with `pdserve make-model`, starts
`pdserve serve` on a free port, waits for /health, and kills the process at the end.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.servers import PDSERVE, free_port, start_server, stop_server

pytestmark = pytest.mark.slow

API_KEY = "live-test-key"
MAX_MODEL_LEN = 512
STARTUP_TIMEOUT_S = 300.0  # building and loading a model on a busy 2-core box
REQUEST_TIMEOUT_S = 120.0


@dataclass
class LiveServer:
    base_url: str
    model: str
    log_path: Path
    process: subprocess.Popen

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> LiveServer:
    work_dir = tmp_path_factory.mktemp("live")
    model_dir = work_dir / "tiny-model"
    made = subprocess.run([str(PDSERVE), "make-model", "--size", "tiny", "--out", str(model_dir)],
                          capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S)
    if made.returncode != 0:
        pytest.fail(f"pdserve make-model failed ({made.returncode}):\n{made.stderr[-4000:]}")
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = work_dir / "server.log"
    process = start_server(["--model", str(model_dir), "--max-model-len", str(MAX_MODEL_LEN),
                            "--api-key", API_KEY], port, log_path, STARTUP_TIMEOUT_S)
    try:
        models = httpx.get(f"{base_url}/v1/models", timeout=REQUEST_TIMEOUT_S,
                           headers={"Authorization": f"Bearer {API_KEY}"}).json()
        yield LiveServer(base_url, models["data"][0]["id"], log_path, process)
    finally:
        stop_server(process)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0,
                         timeout=REQUEST_TIMEOUT_S)


def test_completion(client, server):
    completion = client.completions.create(model=server.model, prompt="The capital of France is",
                                           max_tokens=8, temperature=0)
    choice = completion.choices[0]
    assert completion.id.startswith("cmpl-") and completion.model == server.model
    assert choice.finish_reason in ("length", "stop") and isinstance(choice.text, str)
    assert 1 <= completion.usage.completion_tokens <= 8
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == (completion.usage.prompt_tokens
                                             + completion.usage.completion_tokens)


def test_streamed_chat_with_usage(client, server):
    chunks = list(client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Say something."}],
        max_tokens=10, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage.completion_tokens == 10 and usage.prompt_tokens > 0
    finish_reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish_reasons[-1] == "length" and set(finish_reasons[:-1]) == {None}


def test_n2_choices(client, server):
    completion = client.completions.create(model=server.model, prompt="Once upon a time", n=2,
                                           max_tokens=16, temperature=1.0, seed=7,
                                           extra_body={"ignore_eos": True})
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.usage.completion_tokens == 32
    # seeds 7 and 8: sampled choices of 16 tokens each differ
    assert completion.choices[0].text != completion.choices[1].text


def _greedy(client, server, **fields):
    return client.completions.create(model=server.model, prompt="Stop strings are", temperature=0,
                                     extra_body={"ignore_eos": True}, **fields)


def test_stop_string_ends_output_right_before_it(client, server):
    unconstrained = _greedy(client, server, max_tokens=40).choices[0].text
    # a stop string whose first occurrence is past the start, so the cut is visible
    length = 3
    starts = [k for k in range(1, len(unconstrained) - length)
              if unconstrained.find(unconstrained[k:k + length]) == k
              and unconstrained[k:k + length].strip()]
    assert starts, f"greedy output too repetitive to pick a stop string: {unconstrained!r}"
    start = starts[len(starts) // 2]
    stop = unconstrained[start:start + length]
    stopped = _greedy(client, server, max_tokens=40, stop=[stop]).choices[0]
    assert stopped.text == unconstrained[:start]
    assert stopped.finish_reason == "stop"


def test_seed_determinism(client, server):
    def sample(seed: int) -> str:
        return client.completions.create(model=server.model, prompt="Random words:", max_tokens=16,
                                         temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text
    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first


def test_logprobs(client, server):
    completion = _greedy(client, server, max_tokens=6, logprobs=3)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    assert len(logprobs.top_logprobs) == len(logprobs.text_offset) == 6
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    for token, lp, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert 1 <= len(top) <= 4 and all(v <= 0 for v in top.values())
        # greedy: the chosen token is the most likely one
        assert lp >= max(top.values()) - 1e-4
    chat = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in content)


CHAT_MESSAGES = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    # (path, body or raw bytes, expected status)
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", {"prompt": "no model"}, 400),
    ("/v1/completions", {"model": "MODEL"}, 400),
    ("/v1/chat/completions", {"model": "MODEL"}, 400),
    ("/v1/completions", {"model": "no-such-model", "prompt": "a"}, 404),
    ("/v1/completions", {"model": "MODEL", "prompt": "hello " * 2000}, 400),
    ("/v1/completions", {"model": "MODEL", "prompt": "hello", "max_tokens": MAX_MODEL_LEN}, 400),
    ("/v1/completions", {"model": "MODEL", "prompt": "hello", "max_tokens": 0}, 400),
    ("/v1/completions", {"model": "MODEL", "prompt": "hello", "temperature": -1}, 400),
    ("/v1/completions", {"model": "MODEL", "prompt": "hello", "top_p": 0}, 400),
    ("/v1/completions", {"model": "MODEL", "prompt": "hello", "n": 0}, 400),
    ("/v1/completions", {"model": "MODEL", "prompt": "hello", "echo": True}, 400),
    ("/v1/chat/completions", {"model": "MODEL", "messages": CHAT_MESSAGES,
                              "top_p": 2.0}, 400),
    ("/v1/chat/completions", {"model": "MODEL", "messages": []}, 400),
]


def _send(server: LiveServer, path: str, body, headers: dict | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}", **(headers or {})}
    if isinstance(body, bytes):
        return httpx.post(f"{server.base_url}{path}", content=body, timeout=REQUEST_TIMEOUT_S,
                          headers={**headers, "content-type": "application/json"})
    if body.get("model") == "MODEL":
        body = {**body, "model": server.model}
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=REQUEST_TIMEOUT_S,
                      headers=headers)


def _assert_serving(server: LiveServer) -> None:
    assert server.process.poll() is None, server.log_tail()
    assert httpx.get(f"{server.base_url}/health", timeout=REQUEST_TIMEOUT_S).status_code == 200


@pytest.mark.parametrize("path,body,status", BAD_REQUESTS)
def test_bad_input_gets_its_4xx_and_server_keeps_serving(server, path, body, status):
    response = _send(server, path, body)
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    _assert_serving(server)


def test_auth_and_body_limit(server):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        response = _send(server, "/v1/completions", {"model": "MODEL", "prompt": "a"}, headers)
        assert response.status_code == 401, response.text
    # the default --max-request-bytes is 4 MiB
    response = _send(server, "/v1/completions", {"model": "MODEL", "prompt": "a" * (5 * 2**20)})
    assert response.status_code == 413, response.text
    assert httpx.get(f"{server.base_url}/metrics", timeout=REQUEST_TIMEOUT_S).status_code == 200
    _assert_serving(server)


def test_metrics_count_served_requests(client, server):
    client.completions.create(model=server.model, prompt="count me", max_tokens=2)
    text = httpx.get(f"{server.base_url}/metrics", timeout=REQUEST_TIMEOUT_S).text
    counts = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("pdserve:time_to_first_token_seconds_count")]
    assert counts and counts[0] >= 1
