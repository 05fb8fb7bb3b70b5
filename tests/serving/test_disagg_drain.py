"""Draining in disaggregated mode: `pdserve serve` with one prefill and one decode instance (local
launcher), real processes, real signals.

A decode instance that gets SIGTERM on its own finishes its running streams, refuses new requests
(the router holds them until the instance is back: it is restarted once it has exited) and is not
counted as failed; the server stays up. SIGTERM to the server lets its streams finish, stops the
instances and exits 0 with none left behind.
"""
from __future__ import annotations

import concurrent.futures
import os
import signal

import httpx
import pytest

from tests.servers import StreamedCompletion, free_port, log_tail, start_server, stop_server, wait_until
from tests.serving.test_disagg_support import KV_BUDGET, instance_children

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 300.0
DEADLINE_S = 240.0  # generous: only reached when something is broken
NUM_STREAMS = 3


def _instance_pid(server_pid: int, name: str) -> int:
    for pid in instance_children(server_pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if name.encode() in f.read().split(b"\0"):
                return pid
    raise AssertionError(f"no live instance process named {name} under {server_pid}")


def _router_counter(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=DEADLINE_S).text
    prefix = f"pdserve:router_{name}_total{{"
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def _long_streams(base_url: str, max_tokens: int) -> list[StreamedCompletion]:
    body = {"model": "tiny", "prompt": "Tell me a long story", "max_tokens": max_tokens, "ignore_eos": True}
    streams = [StreamedCompletion(base_url, body, DEADLINE_S) for _ in range(NUM_STREAMS)]
    wait_until(lambda: all(len(s.events) >= 3 for s in streams), "every stream to begin", DEADLINE_S)
    return streams


def _assert_finished(stream: StreamedCompletion) -> None:
    stream.join(DEADLINE_S)
    assert stream.status == 200 and stream.events[-1] == "[DONE]", stream.events[-3:]
    assert stream.finish_reasons == ["length"], stream.events[-3:]
    assert not any("error" in e for e in stream.events if isinstance(e, dict)), stream.events[-3:]


def test_a_draining_instance_finishes_its_streams_then_the_server_drains(tiny_model_dir, tmp_path):
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    process = start_server(["--mode", "disaggregated", "--num-prefill", "1", "--num-decode", "1",
                            "--model", tiny_model_dir, "--served-model-name", "tiny", "--max-model-len", "1024",
                            "--kv-cache-memory-bytes", KV_BUDGET, "--shutdown-timeout", "600"],
                           port, log_path, STARTUP_TIMEOUT_S)
    try:
        # ---- SIGTERM to the decode instance alone ----
        decode_pid = _instance_pid(process.pid, "decode-0")
        streams = _long_streams(base_url, max_tokens=300)
        os.kill(decode_pid, signal.SIGTERM)
        wait_until(lambda: "instance decode-0 draining" in log_tail(log_path, 200_000), "decode-0 to drain",
                   DEADLINE_S)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # sent while decode-0 drains: refused there, it waits for decode-0 to be back
            late = pool.submit(httpx.post, f"{base_url}/v1/completions", timeout=DEADLINE_S,
                               json={"model": "tiny", "prompt": "late", "max_tokens": 4, "ignore_eos": True})
            for stream in streams:
                _assert_finished(stream)
            reply = late.result(DEADLINE_S)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4, reply.text
        wait_until(lambda: not os.path.exists(f"/proc/{decode_pid}"), "the drained instance to exit", DEADLINE_S)
        assert _instance_pid(process.pid, "decode-0") != decode_pid  # restarted
        log = log_tail(log_path, 200_000)
        assert "instance decode-0 drained" in log
        assert "decode-0" in log and "is draining: no new requests go to it" in log
        assert _router_counter(base_url, "num_instance_failures") == 0  # not counted as a crash
        assert _router_counter(base_url, "num_instance_restarts") == 1
        assert process.poll() is None

        # ---- SIGTERM to the server ----
        streams = _long_streams(base_url, max_tokens=300)
        instances = instance_children(process.pid)
        assert len(instances) == 2
        process.send_signal(signal.SIGTERM)
        for stream in streams:
            _assert_finished(stream)
        assert process.wait(DEADLINE_S) == 0, log_tail(log_path)
        assert not [pid for pid in instances if os.path.exists(f"/proc/{pid}")], "instances outlived the server"
    finally:
        stop_server(process)
