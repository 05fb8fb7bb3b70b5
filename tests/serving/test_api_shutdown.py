"""`pdserve serve` (tiny model, real process) on SIGTERM and against slow clients.

SIGTERM drains: running streams finish (long --shutdown-timeout) or end with an error event and
`data: [DONE]` (short one), new connections are refused, /health says 503 meanwhile, and the process
exits 0. Slow clients: a connection whose headers never complete is closed, a body that never
completes gets a 408, and the server keeps serving.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.servers import (StreamedCompletion, connection_refused, free_port, log_tail, start_server,
                           stop_server, wait_until)

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 300.0
# generous bounds: only reached when something is broken (the box is slow and shared)
DEADLINE_S = 120.0
SLACK_S = 20.0
NUM_STREAMS = 3


def _serve(model_dir: str, tmp_path: Path, *flags: str, new_session: bool = False):
    port = free_port()
    log_path = tmp_path / "server.log"
    process = start_server(["--model", model_dir, "--served-model-name", "tiny", "--max-model-len", "2048",
                            *flags], port, log_path, STARTUP_TIMEOUT_S, new_session)
    return process, port, f"http://127.0.0.1:{port}", log_path


def _long_streams(base_url: str, max_tokens: int) -> list[StreamedCompletion]:
    """NUM_STREAMS streams that run for a while (ignore_eos), once each has begun."""
    body = {"model": "tiny", "prompt": "Tell me a long story", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0}
    streams = [StreamedCompletion(base_url, body, DEADLINE_S) for _ in range(NUM_STREAMS)]
    wait_until(lambda: all(len(s.events) >= 3 for s in streams), "every stream to begin", DEADLINE_S)
    return streams


def test_sigterm_lets_running_streams_finish(tiny_model_dir, tmp_path):
    process, port, base_url, log_path = _serve(tiny_model_dir, tmp_path, "--shutdown-timeout", "600")
    try:
        max_tokens = 1500
        streams = _long_streams(base_url, max_tokens)
        with httpx.Client(base_url=base_url, timeout=DEADLINE_S) as open_connection:
            assert open_connection.get("/health").status_code == 200
            process.send_signal(signal.SIGTERM)
            wait_until(lambda: open_connection.get("/health").status_code == 503, "/health to say 503",
                       SLACK_S, interval_s=0.1)
            # a request on a connection opened before: refused with a message, then closed
            refused = open_connection.post("/v1/completions", json={"model": "tiny", "prompt": "late"})
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        assert refused.headers["connection"] == "close"
        assert connection_refused(port)  # new connections
        assert not any(s.events[-1] == "[DONE]" for s in streams), "the streams ended before the drain was seen"
        for stream in streams:
            stream.join(DEADLINE_S)
            assert stream.events[-1] == "[DONE]" and stream.finish_reasons == ["length"], stream.events[-3:]
            assert not any("error" in e for e in stream.events if isinstance(e, dict))
            assert sum(len(e["choices"][0]["text"]) > 0 for e in stream.events[:-1]) > 0
        assert process.wait(DEADLINE_S) == 0, log_tail(log_path)
    finally:
        stop_server(process)


@pytest.mark.parametrize("sig, flags", [
    (signal.SIGINT, ()),
    (signal.SIGTERM, ()),
    (signal.SIGTERM, ("--tensor-parallel-size", "2")),
    (signal.SIGTERM, ("--mode", "disaggregated", "--num-prefill", "1", "--num-decode", "1")),
], ids=["ctrl-c", "sigterm", "sigterm-tp2", "sigterm-1p1d"])
def test_a_signal_to_the_whole_process_group_drains_as_one_to_the_server(tiny_model_dir, tmp_path, sig, flags):
    """Ctrl-C in a terminal, `timeout`, systemd's stop: the signal reaches every process of the group
    (engine process, worker ranks, instances) at once. Only the server and the instances act on it, by
    draining: the running streams finish, nothing dies, and everything exits."""
    process, _, base_url, log_path = _serve(tiny_model_dir, tmp_path, "--shutdown-timeout", "600", *flags,
                                            new_session=True)
    try:
        streams = _long_streams(base_url, max_tokens=1500)
        os.killpg(process.pid, sig)
        with httpx.Client(base_url=base_url, timeout=DEADLINE_S) as probe:
            wait_until(lambda: _health(probe) != 200, "the drain", SLACK_S, interval_s=0.1)
        assert not any(s.events[-1] == "[DONE]" for s in streams), "the streams ended before the drain was seen"
        for stream in streams:
            stream.join(DEADLINE_S)
            assert stream.events[-1] == "[DONE]" and stream.finish_reasons == ["length"], stream.events[-3:]
            assert not any("error" in e for e in stream.events if isinstance(e, dict))
        assert process.wait(DEADLINE_S) == 0, log_tail(log_path)
        log = log_tail(log_path, 50000)
        assert "died" not in log and "Traceback" not in log, log
    finally:
        stop_server(process)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # anything of the group left behind


def _health(client: httpx.Client) -> int:
    try:
        return client.get("/health").status_code
    except httpx.TransportError:  # the listener closed: draining too
        return 0


def test_sigterm_ends_streams_still_running_at_the_shutdown_timeout(tiny_model_dir, tmp_path):
    process, _, base_url, log_path = _serve(tiny_model_dir, tmp_path, "--shutdown-timeout", "1")
    try:
        streams = _long_streams(base_url, max_tokens=2000)  # far more than a second's worth
        sent_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        for stream in streams:
            stream.join(DEADLINE_S)
            assert stream.events[-1] == "[DONE]", stream.events[-3:]
            error = stream.events[-2]["error"]
            assert error["code"] == 503 and error["type"] == "service_unavailable", error
            assert "shutting down" in error["message"]
            assert stream.finish_reasons == []
        assert process.wait(DEADLINE_S) == 0, log_tail(log_path)
        assert time.monotonic() - sent_at < 1 + SLACK_S
        assert "ending 3 generation(s) still running" in log_tail(log_path, 20000)
    finally:
        stop_server(process)


def _read_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    """What the server sends before it closes the connection (raises if it is still open after
    timeout_s)."""
    sock.settimeout(timeout_s)
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def _trickle_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    """Send a byte every 0.2 s (so that no idle timer could fire) and collect what comes back, until
    the server closes the connection (raises if it is still open after timeout_s)."""
    sock.settimeout(0.2)
    received = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            sock.sendall(b"x")
            chunk = sock.recv(4096)
        except socket.timeout:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the connection is still open after {timeout_s:g}s")


def test_slow_clients_are_cut_off_at_the_read_deadlines(tiny_model_dir, tmp_path):
    process, port, base_url, log_path = _serve(tiny_model_dir, tmp_path, "--request-header-timeout-s", "2",
                                               "--request-body-timeout-s", "2")
    try:
        body_head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n")
        with socket.create_connection(("127.0.0.1", port)) as silent, \
                socket.create_connection(("127.0.0.1", port)) as partial_headers, \
                socket.create_connection(("127.0.0.1", port)) as partial_body, \
                socket.create_connection(("127.0.0.1", port)) as trickled_body:
            partial_headers.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
            partial_body.sendall(body_head + b'{"model": ')  # 10 of the 1000 bytes announced
            # answered 413 at once (over --max-request-bytes); the rest of its body then trickles in
            trickled_body.sendall(body_head.replace(b"1000", b"%d" % (8 * 2**20)) + b'{"model": ')
            started = time.monotonic()
            # a normal request meanwhile is served
            reply = httpx.post(f"{base_url}/v1/completions", timeout=DEADLINE_S,
                               json={"model": "tiny", "prompt": "hi", "max_tokens": 3})
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 3
            assert _read_until_closed(silent, 2 + SLACK_S) == b""
            assert _read_until_closed(partial_headers, 2 + SLACK_S) == b""
            answer = _read_until_closed(partial_body, 2 + SLACK_S)
            too_large = _trickle_until_closed(trickled_body, 2 + SLACK_S)
            assert time.monotonic() - started < 2 + SLACK_S
        assert too_large.startswith(b"HTTP/1.1 413"), too_large
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer
        assert b"connection: close" in head.lower()
        assert b'"code":"request_timeout"' in body and b"--request-body-timeout-s" in body
        assert httpx.get(f"{base_url}/health", timeout=DEADLINE_S).status_code == 200
        assert process.poll() is None, log_tail(log_path)
    finally:
        stop_server(process)
