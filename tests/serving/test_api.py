"""The HTTP server over real sockets: the official `openai` client against uvicorn (fake engine in
the server's thread), real client disconnects, and `run_server`'s lifecycle."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from serving.api import build_app, run_server
from serving.config import ServerConfig
from tests.servers import StreamedCompletion, connection_refused, free_port, wait_until
from tests.serving.fake_engine import FakeEngine

MODEL = "fake-model"
API_KEY = "test-key"
REPO_ROOT = Path(__file__).resolve().parents[2]
# generous: only reached when something is broken
DEADLINE_S = 30.0


def _wait_for(condition, what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def serve_in_thread(app):
    """uvicorn in a thread of its own, on a socket bound here (port 0: no race for a port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: server.started or not thread.is_alive(), "uvicorn to start")
        assert server.started, "uvicorn failed to start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(DEADLINE_S)
        sock.close()


@pytest.fixture(scope="module")
def engine():
    return FakeEngine(max_model_len=512)


@pytest.fixture(scope="module")
def base_url(engine):
    with serve_in_thread(build_app(engine, ServerConfig(api_key=API_KEY))) as url:
        yield url


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0,
                         timeout=DEADLINE_S)


def test_openai_completion(client):
    completion = client.completions.create(model=MODEL, prompt="hello", max_tokens=5,
                                           temperature=0)
    assert completion.id.startswith("cmpl-")
    assert completion.choices[0].text == "hello"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.prompt_tokens == 5 and completion.usage.completion_tokens == 5


def test_openai_streamed_chat_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "tell me"}], max_tokens=6,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text) == 6
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


def test_openai_n2_and_logprobs(client):
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], n=2, seed=3, max_tokens=8,
        logprobs=True, top_logprobs=3)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content != chat.choices[1].message.content
    for choice in chat.choices:
        assert len(choice.logprobs.content) == 8
        assert all(e.logprob <= 0 and len(e.top_logprobs) == 3 for e in choice.logprobs.content)
    completion = client.completions.create(model=MODEL, prompt="abc", max_tokens=4, logprobs=2,
                                           temperature=0)
    logprobs = completion.choices[0].logprobs
    assert logprobs.tokens == ["a", "b", "c", "a"]
    assert len(logprobs.top_logprobs) == 4 and logprobs.text_offset == [0, 1, 2, 3]


def test_openai_errors_and_server_keeps_serving(client, base_url):
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="a", max_tokens=0)
    assert bad.value.status_code == 400 and "max_tokens" in bad.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="a" * 600)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}],
                                       temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="a")
    wrong_key = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
    too_big = httpx.post(f"{base_url}/v1/completions", timeout=DEADLINE_S,
                         json={"model": MODEL, "prompt": "a" * (5 * 2**20)},
                         headers={"Authorization": f"Bearer {API_KEY}"})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    assert client.models.list().data[0].id == MODEL
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=1).choices


def test_openai_hostile_inputs_are_400_and_server_keeps_serving(client):
    def nested(depth: int):
        return [nested(depth - 1)] if depth else []

    hostile = [({"stop_token_ids": [10**6]}, "stop_token_ids contains 1000000"),
               ({"stop": ["x" * 100_000]}, "at most 1000 characters"),
               ({"ignored": nested(100)}, "nested too deeply")]
    for extra_body, says in hostile:
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model=MODEL, prompt="a", max_tokens=2, extra_body=extra_body)
        assert bad.value.status_code == 400 and says in bad.value.message
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=1).choices


def _sub_request_ids(engine: FakeEngine, prompt_marker: str) -> list[str]:
    marker_ids = engine.tokenizer.encode(prompt_marker)
    return [s.request_id for s in engine.submitted if s.prompt_token_ids == marker_ids]


def _assert_aborted(engine: FakeEngine, request_ids: list[str]) -> None:
    _wait_for(lambda: set(request_ids) <= set(engine.aborted_ids)
              and not set(request_ids) & set(engine.active_ids),
              f"{request_ids} to be aborted")
    assert set(request_ids) <= set(engine.abort_calls)  # explicitly, not only by cancellation


def _stalled_engine_url(stall_after_tokens: int):
    engine = FakeEngine(max_model_len=512, stall_after_tokens=stall_after_tokens)
    return engine, serve_in_thread(build_app(engine, ServerConfig()))


def test_stream_disconnect_aborts_every_choice():
    engine, server = _stalled_engine_url(stall_after_tokens=2)
    with server as url, httpx.Client(timeout=DEADLINE_S) as http:
        body = {"model": MODEL, "prompt": "disconnect-me", "n": 2, "max_tokens": 100,
                "stream": True}
        with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
        # leaving the block closes the half-read response: a real disconnect
        request_ids = _sub_request_ids(engine, "disconnect-me")
        assert len(request_ids) == 2
        _assert_aborted(engine, request_ids)


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_while_waiting_for_first_token_aborts(stream):
    engine, server = _stalled_engine_url(stall_after_tokens=0)
    with server as url:
        body = {"model": MODEL, "prompt": "stuck", "max_tokens": 10, "stream": stream}
        with pytest.raises(httpx.ReadTimeout):
            # the request never produces output; the client gives up and closes the socket
            httpx.post(f"{url}/v1/completions", json=body, timeout=1.0)
        request_ids = _sub_request_ids(engine, "stuck")
        assert len(request_ids) == 1
        _assert_aborted(engine, request_ids)
        # the server is still serving
        assert httpx.get(f"{url}/health", timeout=DEADLINE_S).status_code == 200


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_run_server_until_cancelled_then_shuts_engine_down():
    engine = FakeEngine()
    port = free_port()
    task = asyncio.create_task(run_server(engine, ServerConfig(port=port, log_level="warning")))
    async with httpx.AsyncClient(timeout=DEADLINE_S) as http:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            assert not task.done(), "run_server exited early"
            assert time.monotonic() < deadline, "server did not come up"
            with contextlib.suppress(httpx.TransportError):
                if (await http.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                    break
            await asyncio.sleep(0.05)
    assert not engine.shutdown_called
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.shutdown_called
    with socket.socket() as sock:  # the listening socket was closed
        sock.bind(("127.0.0.1", port))


_SERVE_SCRIPT = """
import asyncio, sys
from serving.api import run_server
from serving.config import ServerConfig
from tests.serving.fake_engine import FakeEngine
engine = FakeEngine()
asyncio.run(run_server(engine, ServerConfig(port=int(sys.argv[1]), log_level="warning")))
print("engine shut down:", engine.shutdown_called, flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_server_gracefully_and_shuts_engine_down(sig):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _SERVE_SCRIPT, str(port)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        def healthy() -> bool:
            assert proc.poll() is None, proc.stdout.read()
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            return False
        _wait_for(healthy, "the server to come up", timeout_s=120)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert "engine shut down: True" in output


# run_server over a fake engine whose requests stall after two tokens (they can only end by being
# aborted, however fast the machine), in a process of its own that gets real signals
_STALLED_SERVER_SCRIPT = """
import asyncio, sys
from serving.api import run_server
from serving.config import ServerConfig
from tests.serving.fake_engine import FakeEngine

class Engine(FakeEngine):
    async def generate(self, request_id, prompt_token_ids, params, **kwargs):
        print("submitted", request_id, flush=True)
        async for output in super().generate(request_id, prompt_token_ids, params, **kwargs):
            yield output

engine = Engine(max_model_len=512, stall_after_tokens=2)
config = ServerConfig(port=int(sys.argv[1]), shutdown_timeout_s=float(sys.argv[2]), log_level="warning")
asyncio.run(run_server(engine, config))
print("aborted:", ",".join(sorted(engine.abort_calls)), flush=True)
print("still active:", ",".join(sorted(engine.active_ids)), flush=True)
print("engine shut down:", engine.shutdown_called, flush=True)
"""


class _StalledServer:
    def __init__(self, shutdown_timeout_s: float) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-c", _STALLED_SERVER_SCRIPT, str(self.port),
                                      str(shutdown_timeout_s)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()
        wait_until(self._healthy, "the server to come up", 120)

    def _healthy(self) -> bool:
        assert self.proc.poll() is None, "".join(self.lines)
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(f"{self.url}/health").status_code == 200
        return False

    def num_submitted(self) -> int:
        return sum(line.startswith("submitted") for line in self.lines)

    def line(self, prefix: str) -> str:
        return next(line for line in self.lines if line.startswith(prefix))[len(prefix):].strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _assert_ended_by_shutdown(stream: StreamedCompletion) -> None:
    assert stream.status == 200 and stream.events[-1] == "[DONE]", stream.events
    error = stream.events[-2]["error"]
    assert error["code"] == 503 and "shutting down" in error["message"], error
    assert stream.finish_reasons == []  # cut, not finished


@pytest.mark.slow
def test_sigterm_ends_what_outlives_the_shutdown_timeout_with_a_503_and_aborts_it():
    server = _StalledServer(shutdown_timeout_s=1.0)
    try:
        body = {"model": MODEL, "prompt": "stall", "max_tokens": 100}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            plain = pool.submit(httpx.post, f"{server.url}/v1/completions", json=body, timeout=DEADLINE_S)
            streams = [StreamedCompletion(server.url, body, DEADLINE_S) for _ in range(2)]
            wait_until(lambda: server.num_submitted() == 3 and all(len(s.events) >= 2 for s in streams),
                       "the requests to be running", DEADLINE_S)
            server.proc.send_signal(signal.SIGTERM)
            for stream in streams:
                _assert_ended_by_shutdown(stream.join(DEADLINE_S))
            response = plain.result(DEADLINE_S)
        assert response.status_code == 503, response.text
        assert "did not finish within the shutdown timeout" in response.json()["error"]["message"]
        assert server.proc.wait(DEADLINE_S) == 0, "".join(server.lines)
        submitted = sorted(line.split()[1] for line in server.lines if line.startswith("submitted"))
        assert server.line("aborted:").split(",") == submitted  # KV freed: each one aborted in the engine
        assert server.line("still active:") == ""
        assert server.line("engine shut down:") == "True"
    finally:
        server.close()


@pytest.mark.slow
def test_second_signal_ends_the_drain_at_once():
    server = _StalledServer(shutdown_timeout_s=600.0)  # the drain would outlast the test
    try:
        body = {"model": MODEL, "prompt": "stall", "max_tokens": 100}
        stream = StreamedCompletion(server.url, body, DEADLINE_S)
        wait_until(lambda: len(stream.events) >= 2, "the stream to start", DEADLINE_S)
        with httpx.Client(timeout=DEADLINE_S) as probe:  # a kept-alive connection, opened before
            assert probe.get(f"{server.url}/health").status_code == 200
            server.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: probe.get(f"{server.url}/health").status_code == 503, "the drain", DEADLINE_S)
        assert connection_refused(server.port)
        assert server.proc.poll() is None and stream.error is None and stream.events[-1] != "[DONE]"
        server.proc.send_signal(signal.SIGTERM)
        _assert_ended_by_shutdown(stream.join(DEADLINE_S))
        assert server.proc.wait(DEADLINE_S) == 0, "".join(server.lines)
        assert server.line("engine shut down:") == "True"
        log = "".join(server.lines)  # the app's lifespan shut down too: no task of it left to cancel
        assert "Traceback" not in log and "CancelledError" not in log, log
    finally:
        server.close()
