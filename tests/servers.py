"""Helpers for tests that run a real `pdserve serve` process on loopback."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
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


def start_server(args: list[str], port: int, log_path: Path, timeout_s: float) -> subprocess.Popen:
    """Start `pdserve serve ARGS --port PORT` with its output in log_path and return once /health
    answers 200. Raises AssertionError, with the server's log, if it exits or stays unhealthy."""
    with open(log_path, "w") as log:
        process = subprocess.Popen([str(PDSERVE), "serve", *args, "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT)
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
