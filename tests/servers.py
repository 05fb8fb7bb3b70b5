"""Helpers for tests that run a real `pdserve serve` process on loopback."""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

PDSERVE = Path(sys.executable).with_name("pdserve")  # the console script of this environment


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(log_path: Path, num_chars: int = 4000) -> str:
    return log_path.read_text(errors="replace")[-num_chars:]


def start_server(args: list[str], port: int, log_path: Path, timeout_s: float,
                 new_session: bool = False) -> subprocess.Popen:
    """Start `pdserve serve ARGS --port PORT` with its output in log_path and return once /health
    answers 200 (new_session: in a process group of its own, whose id is its pid, as a terminal's
    foreground job is). Raises AssertionError, with the server's log, if it exits or stays unhealthy."""
    with open(log_path, "w") as log:
        process = subprocess.Popen([str(PDSERVE), "serve", *args, "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=new_session)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"pdserve serve exited with {process.returncode}:\n{log_tail(log_path)}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return process
        time.sleep(0.3)
    stop_server(process)
    raise AssertionError(f"pdserve serve not healthy after {timeout_s}s:\n{log_tail(log_path)}")


def stop_server(process: subprocess.Popen, grace_s: float = 60.0) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_until(condition, what: str, timeout_s: float, interval_s: float = 0.05) -> None:
    """Poll condition() until it is true; AssertionError naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(interval_s)


def connection_refused(port: int) -> bool:
    """True if nothing accepts connections on 127.0.0.1:port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


class StreamedCompletion:
    """POST a streamed completion on a thread of its own; `events` fills as the server sends them
    (the JSON chunks as dicts, then "[DONE]"), `error` holds what the client raised, if anything."""

    def __init__(self, base_url: str, body: dict, timeout_s: float, path: str = "/v1/completions") -> None:
        self.events: list[dict | str] = []
        self.status: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(base_url + path, {**body, "stream": True},
                                                                timeout_s), daemon=True)
        self._thread.start()

    def _run(self, url: str, body: dict, timeout_s: float) -> None:
        try:
            with httpx.stream("POST", url, json=body, timeout=timeout_s) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        data = line[len("data: "):]
                        self.events.append(data if data == "[DONE]" else json.loads(data))
        except BaseException as e:  # noqa: BLE001 - reported to the test through `error`
            self.error = e

    @property
    def finish_reasons(self) -> list[str]:
        return [c["finish_reason"] for e in self.events if isinstance(e, dict)
                for c in e.get("choices", []) if c.get("finish_reason")]

    def join(self, timeout_s: float) -> "StreamedCompletion":
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"the stream did not end within {timeout_s:g}s"
        assert self.error is None, f"the stream failed: {self.error!r}"
        return self
