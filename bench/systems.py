"""The systems a side-by-side comparison starts, one at a time, as subprocesses on loopback.

Systems come from a small YAML file (or from `--systems` names):

    model: /path/to/model            # default model directory for every system
    systems:
      - {name: pdserve-colocated, kind: pdserve}
      - {name: pdserve-disaggregated, kind: pdserve, mode: disaggregated, num_prefill: 1, num_decode: 1}
      - {name: vllm-cpu, kind: vllm, venv: .venv-vllm, max_model_len: 2048, kv_cache_space_gib: 2}
      - {name: elsewhere, kind: url, url: "http://127.0.0.1:9000"}

Each started server gets a free port chosen at run time and its own process group, so stopping it
also stops the workers it spawned; its output goes to `<name>-server.log` in the result directory.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

KINDS = ("pdserve", "vllm", "url")
SHORT_NAMES = ("pdserve-colocated", "pdserve-disaggregated", "vllm")
_POLL_INTERVAL_S = 0.5
_STOP_GRACE_S = 30.0
_LOG_TAIL_CHARS = 3000


@dataclass(frozen=True)
class SystemSpec:
    name: str
    kind: str
    model: str | None = None  # model directory served (pdserve, vllm)
    url: str | None = None  # kind url: the base URL of a running OpenAI-compatible server
    mode: str = "colocated"  # pdserve: colocated or disaggregated
    num_prefill: int = 1
    num_decode: int = 1
    venv: str | None = None  # vllm: the virtual environment vllm-cpu is installed in
    max_model_len: int | None = None
    kv_cache_space_gib: float = 1.0  # vllm: VLLM_CPU_KVCACHE_SPACE
    extra_args: tuple[str, ...] = ()
    num_devices: int | None = None  # for goodput per device; None: derived from the kind and mode
    startup_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"system {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "url" and not (self.url or "").startswith(("http://", "https://")):
            raise ValueError(f"system {self.name!r}: kind url needs url: http://HOST:PORT")
        if self.kind != "url" and not self.model:
            raise ValueError(f"system {self.name!r}: give the model directory (model: DIR, or --model)")
        if self.kind == "vllm" and not self.venv:
            raise ValueError(f"system {self.name!r}: kind vllm needs the virtual environment vllm-cpu "
                             "is installed in: venv: PATH in the YAML, or --vllm-venv PATH (see PEERS.md)")

    @property
    def devices(self) -> int:
        if self.num_devices is not None:
            return self.num_devices
        if self.kind == "pdserve" and self.mode == "disaggregated":
            return self.num_prefill + self.num_decode
        return 1


def load_systems(path: str, default_model: str | None = None) -> list[SystemSpec]:
    with open(path) as handle:
        loaded = yaml.safe_load(handle) or {}
    if not isinstance(loaded, dict) or not isinstance(loaded.get("systems"), list):
        raise ValueError(f"{path}: expected a mapping with a `systems:` list (see bench/systems.py)")
    model = loaded.get("model", default_model)
    known = {f.name for f in dataclasses.fields(SystemSpec)}
    specs = []
    for entry in loaded["systems"]:
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        entry = {"model": model, **entry}
        entry["extra_args"] = tuple(str(a) for a in entry.get("extra_args", ()))
        specs.append(SystemSpec(**entry))
    return specs


def systems_from_names(names: list[str], model: str | None, vllm_venv: str | None,
                       max_model_len: int | None, urls: list[str]) -> list[SystemSpec]:
    """`--systems pdserve-colocated,vllm` plus `--url NAME=URL` entries."""
    specs = []
    for name in names:
        if name == "pdserve-colocated":
            specs.append(SystemSpec(name, "pdserve", model=model, max_model_len=max_model_len))
        elif name == "pdserve-disaggregated":
            specs.append(SystemSpec(name, "pdserve", model=model, mode="disaggregated",
                                    max_model_len=max_model_len))
        elif name == "vllm":
            specs.append(SystemSpec("vllm-cpu", "vllm", model=model, venv=vllm_venv,
                                    max_model_len=max_model_len))
        else:
            raise ValueError(f"--systems: unknown {name!r}; use {', '.join(SHORT_NAMES)} or --url NAME=URL")
    for item in urls:
        name, sep, url = item.partition("=")
        if not sep:
            raise ValueError(f"--url {item!r}: write NAME=URL, e.g. --url other=http://127.0.0.1:9000")
        specs.append(SystemSpec(name, "url", url=url))
    return specs


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pdserve_executable() -> list[str]:
    beside = Path(sys.executable).with_name("pdserve")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("pdserve")
    return [found] if found else [sys.executable, "-m", "serving.cli"]


def launch_command(spec: SystemSpec, port: int) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) that starts `spec` listening on 127.0.0.1:port."""
    limit = ["--max-model-len", str(spec.max_model_len)] if spec.max_model_len else []
    if spec.kind == "pdserve":
        mode = ([] if spec.mode == "colocated" else
                ["--mode", spec.mode, "--num-prefill", str(spec.num_prefill),
                 "--num-decode", str(spec.num_decode)])
        argv = [*pdserve_executable(), "serve", "--model", str(spec.model), "--port", str(port),
                *mode, *limit, *spec.extra_args]
        return argv, {}
    python = str(Path(spec.venv or "") / "bin" / "python")
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(spec.model),
            "--dtype", "float32", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port),
            *limit, *spec.extra_args]
    # vllm-cpu sizes its KV cache from this variable; it is how that server is configured
    return argv, {"VLLM_CPU_KVCACHE_SPACE": f"{spec.kv_cache_space_gib:g}"}


class RunningSystem:
    """`with RunningSystem(spec, log_dir) as base_url:` starts (or just names) a server, then stops it."""

    def __init__(self, spec: SystemSpec, log_dir: Path):
        self.spec = spec
        self.log_path = log_dir / f"{spec.name}-server.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> str:
        if self.spec.kind == "url":
            return str(self.spec.url).rstrip("/")
        port = free_port()
        argv, extra_env = launch_command(self.spec, port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **extra_env}, start_new_session=True)
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base_url, self.process, self.spec.startup_timeout_s, self.log_path)
        except BaseException:
            self.stop()
            raise
        return base_url

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def cpu_seconds(self) -> float | None:
        """CPU seconds used so far by the server's processes (its process group); None for a URL."""
        if self.process is None:
            return None
        from bench.processes import group_cpu_seconds
        return group_cpu_seconds(self.process.pid)

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it after a grace period."""
        if self.process is None or self.process.poll() is not None:
            return
        _signal_group(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=_STOP_GRACE_S)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the group we created with start_new_session: the server and its workers
    except ProcessLookupError:
        pass


def wait_ready(base_url: str, process: subprocess.Popen | None, timeout_s: float, log_path: Path) -> None:
    """Poll /health, then /v1/models, until one answers 200; raise with the log's tail otherwise."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5.0) as http:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode} before it was "
                                   f"ready; its log ({log_path}) ends with:\n{_tail(log_path)}")
            for path in ("/health", "/v1/models"):
                try:
                    if http.get(base_url + path).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(_POLL_INTERVAL_S)
    raise RuntimeError(f"{base_url} did not answer /health or /v1/models within {timeout_s:g} s; raise "
                       f"startup_timeout_s or read {log_path}:\n{_tail(log_path)}")


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
    except OSError:
        return "(no log)"
