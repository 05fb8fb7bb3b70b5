"""Helpers of the chaos suite (this module holds no tests): a deployment served over real HTTP in the
test process, and `assert_recovered`, the check every scenario ends with.

A deployment is served the way `pdserve serve` serves it (`build_app` under uvicorn), but on a
`LoopThread` of the test process, so that a test can talk HTTP like any client (from its own event
loop, `asyncio.run` in the test thread) and inspect the engine on the server's loop:

    test thread ──HTTP──► uvicorn + build_app ──► AsyncLLM (colocated) or the router (disaggregated)
         │                 [server loop thread]        └──gRPC──► instance processes (local launcher)
         └── app.on_server(coro): integrity checks, router state ──┘
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from dataclasses import dataclass

import httpx
import uvicorn

from serving.api.server import build_app
from serving.config import Config
from serving.launchers.local import process_tree
from serving.router import build_disaggregated_client
from serving.engine.async_llm import AsyncLLM
from tests.chaos.traffic import run_all
from tests.servers import free_port
from tests.serving.test_disagg_support import LoopThread, make_prompts, tiny_config

# Every wait of the deployment short, so that a fault shows within seconds:
#   health check every 1 s, answered within max(2, 5 x interval) = 5 s, or the instance is dead;
#   a KV RPC answered within 2 s, a transfer tried twice; a reserved transfer without progress for
#   1.5 s dropped by the decode side, whose policy then recomputes the prompt.
CHAOS_TIMEOUTS = {"instance_timeout_s": 20.0, "instance_start_timeout_s": 120.0, "health_check_interval_s": 1.0,
                  "kv_transfer_rpc_timeout_s": 2.0, "kv_transfer_stall_timeout_s": 1.5,
                  "kv_transfer_max_retries": 1, "kv_transfer_failure_policy": "recompute",
                  "kv_transfer_lease_ttl_s": 10.0}
KV_BUDGET = "32MiB"  # 1024 blocks of 16 tokens of the tiny model per instance: storms fit without queueing
_SLACK_S = 5.0  # a busy 2-core machine
RESTART_TIMEOUT_S = 90.0  # a dead (or hung: 10 s grace, then SIGKILL) instance replaced and serving again
REQUEST_TIMEOUT_S = 60.0  # no request of this suite should take longer; one that does is hung

PROBE_PROMPT = make_prompts(2024, [40])[0]
PROBE_MAX_TOKENS = 16


def chaos_config(model_dir: str, **changes) -> Config:
    return tiny_config(model_dir, **{"kv_cache_memory_bytes": KV_BUDGET, **CHAOS_TIMEOUTS, **changes})


def recovery_timeout_s(config: Config) -> float:
    """How long freeing every block may take once the chaos is over: a KV lease ends, acknowledged or
    not, within --kv-transfer-lease-ttl-s of the send's start; a decode-side reservation within the
    stall timeout, or when a health check finds its peer dead."""
    deploy = config.deploy
    health_s = max(2.0, 5 * deploy.health_check_interval_s) + deploy.health_check_interval_s
    return max(deploy.kv_transfer_lease_ttl_s, deploy.kv_transfer_stall_timeout_s + health_s) + _SLACK_S


class ServedApp:
    """An engine behind the real HTTP app, under uvicorn on a LoopThread, on a free port."""

    def __init__(self, engine, config: Config) -> None:
        self.engine = engine
        self.config = config
        self.loop = LoopThread()
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        app = build_app(engine, dataclasses.replace(config.server, port=port))
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                     lifespan="off"))
        self._serving = asyncio.run_coroutine_threadsafe(self._server.serve(), self.loop.loop)
        deadline = time.monotonic() + 30
        while not self._server.started:
            if self._serving.done():
                self._serving.result()  # raises why uvicorn stopped
            assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
            time.sleep(0.05)

    @property
    def model(self) -> str:
        return self.engine.model_info.name

    @property
    def disaggregated(self) -> bool:
        return self.config.deploy.mode == "disaggregated"

    def on_server(self, coro, timeout_s: float = REQUEST_TIMEOUT_S):
        """Run coro on the server's event loop (the router's state and channels live there)."""
        return self.loop.run(coro, timeout_s)

    def instance(self, name: str):
        """The router's InstanceState of `name` (plain reads only from the test thread)."""
        return next(s for s in self.engine._pool.instances if s.name == name)

    def pid(self, name: str) -> int:
        return self.engine._launcher.pid(name)

    def close(self) -> None:
        self._server.should_exit = True
        try:
            self._serving.result(30)
        finally:
            self.loop.run(self.engine.shutdown(), 120)
            self.loop.close()


@contextlib.contextmanager
def served(config: Config):
    """A deployment of `config` behind HTTP; instance processes are the local launcher's children."""
    if config.deploy.mode == "colocated":
        engine = AsyncLLM.from_config(config)
    else:
        engine = build_disaggregated_client(config)
    try:
        app = ServedApp(engine, config)
    except BaseException:
        loop = LoopThread()
        loop.run(engine.shutdown(), 120)
        loop.close()
        raise
    try:
        if app.disaggregated:
            app.on_server(_bind_router(engine))
        yield app
    finally:
        app.close()


class Deployment:
    """The deployment a module's scenarios share. A scenario that leaves it broken (an instance down
    for good, a request or a block still held) would make every later scenario fail for its reason,
    so the next scenario then gets a fresh deployment of the same config (the reference output
    stays: it must not depend on the deployment)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._context = None
        self._app: ServedApp | None = None

    def app(self) -> ServedApp:
        if self._app is not None and not _is_clean(self._app):
            print("chaos: the previous scenario left the deployment broken; starting a fresh one")
            self.close()
        if self._app is None:
            self._context = served(self.config)
            self._app = self._context.__enter__()
        return self._app

    def close(self) -> None:
        context, self._context, self._app = self._context, None, None
        if context is not None:
            context.__exit__(None, None, None)


def _is_clean(app: ServedApp) -> bool:
    try:
        if app.disaggregated:
            app.on_server(wait_all_up(app.engine, RESTART_TIMEOUT_S), RESTART_TIMEOUT_S + 10)
        # a scenario that passed has drained already; one that failed has had its chance
        reports = app.on_server(wait_drained(app.engine, _SLACK_S), _SLACK_S + REQUEST_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - whatever went wrong, the deployment is not fit to reuse
        return False
    return all(r.ok and r.drained for r in reports.values())


async def _bind_router(client) -> None:
    client.pool  # the router's pool, channels and health checks start on the server's loop


# ---- the check every scenario ends with ----
def greedy_probe(app: ServedApp) -> tuple[str, list[str], int]:
    """(text, tokens, completion_tokens) of a fixed greedy completion over HTTP."""
    payload = {"model": app.model, "prompt": PROBE_PROMPT, "max_tokens": PROBE_MAX_TOKENS, "temperature": 0,
               "ignore_eos": True, "logprobs": 1}
    response = httpx.post(f"{app.base_url}/v1/completions", json=payload, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, f"the greedy probe got HTTP {response.status_code}: {response.text}"
    body = response.json()
    choice = body["choices"][0]
    return choice["text"], choice["logprobs"]["tokens"], body["usage"]["completion_tokens"]


def assert_recovered(app: ServedApp, reference: tuple, timeout_s: float | None = None) -> None:
    """After a scenario: every instance is up again, /health answers 200, the fixed greedy prompt gives
    the reference tokens, and within `timeout_s` (the configured lease-ending bound) every instance
    passes check_integrity, holds no request and no KV lease, and has every block free."""
    timeout_s = timeout_s or recovery_timeout_s(app.config)
    if app.disaggregated:
        app.on_server(wait_all_up(app.engine, RESTART_TIMEOUT_S), RESTART_TIMEOUT_S + 10)
    response = httpx.get(f"{app.base_url}/health", timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, f"/health answered {response.status_code}: {response.text}"
    assert greedy_probe(app) == reference, "greedy output of the fixed prompt changed after the chaos"
    reports = app.on_server(wait_drained(app.engine, timeout_s), timeout_s + REQUEST_TIMEOUT_S)
    broken = [f"{name}: {r.error}" for name, r in reports.items() if not r.ok]
    assert not broken, f"check_integrity failed: {'; '.join(broken)}"
    held = [f"{name}: {r.describe()}" for name, r in reports.items() if not r.drained]
    assert not held, (f"not drained {timeout_s:.0f} s after the chaos: {'; '.join(held)}"
                      + transfer_counters_note(app))
    if app.disaggregated:  # and the router sees it so (its load figures come from polls)
        app.on_server(wait_router_sees_idle(app.engine, 5 * app.config.deploy.health_check_interval_s + _SLACK_S))


def transfer_counters_note(app: ServedApp) -> str:
    if not app.disaggregated:
        return ""
    return f"\nKV transfer counters: {app.engine.get_stats().extra['kv_transfer']}"


@dataclass(frozen=True)
class InstanceReport:
    ok: bool
    error: str
    num_free_blocks: int
    num_total_blocks: int
    num_requests: int
    num_leased: int

    @property
    def drained(self) -> bool:
        return self.num_requests == 0 and self.num_leased == 0 and self.num_free_blocks == self.num_total_blocks

    def describe(self) -> str:
        return (f"{self.num_requests} requests, {self.num_leased} KV leases, "
                f"{self.num_total_blocks - self.num_free_blocks} of {self.num_total_blocks} blocks held")


def _colocated_report(core) -> InstanceReport:
    try:
        core.check_integrity()
        ok, error = True, ""
    except AssertionError as e:
        ok, error = False, str(e) or "check_integrity failed"
    return InstanceReport(ok, error, core.kv.pool.num_free_blocks, core.kv.pool.num_blocks,
                          len(core.scheduler.requests), len(core.scheduler.held))


async def integrity_reports(engine, timeout_s: float) -> dict[str, InstanceReport]:
    if isinstance(engine, AsyncLLM):
        return {"colocated": await asyncio.wait_for(engine.call(_colocated_report), timeout_s)}
    replies = await asyncio.wait_for(engine.check_integrity(), timeout_s)
    return {name: InstanceReport(r.ok, r.error, r.num_free_blocks, r.num_total_blocks, r.num_requests,
                                 r.num_leased) for name, r in replies.items()}


async def wait_drained(engine, timeout_s: float) -> dict[str, InstanceReport]:
    """Every instance's report once all are drained, or the last reports at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        reports = await integrity_reports(engine, max(1.0, deadline - time.monotonic()) + _SLACK_S)
        if all(r.drained for r in reports.values()) or time.monotonic() > deadline:
            return reports
        await asyncio.sleep(0.2)


async def wait_all_up(client, timeout_s: float) -> None:
    """Until every instance of the deployment is up (restarted if it died); AssertionError naming
    those still down at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        down = [s for s in client.pool.instances if not s.up]
        if not down:
            return
        assert time.monotonic() < deadline, ("instances still down after %.0f s: %s" % (
            timeout_s, ", ".join(f"{s.name} (restarts so far: {s.num_restarts})" for s in down)))
        await asyncio.sleep(0.2)


async def wait_router_sees_idle(client, timeout_s: float) -> None:
    """Until the router's last poll of every instance shows all its blocks free (it routes on those
    figures); AssertionError naming the instances it still sees busy."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy = [f"{s.name}: {s.stats.num_free_blocks} of {s.stats.num_total_blocks} blocks free"
                for s in client.pool.instances if s.stats.num_free_blocks != s.stats.num_total_blocks]
        if not busy:
            return
        assert time.monotonic() < deadline, f"the router still sees busy instances: {'; '.join(busy)}"
        await asyncio.sleep(0.1)


# ---- processes ----
def process_state(pid: int) -> str | None:
    """The /proc state letter (R, S, T stopped, Z zombie, ...), None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def assert_replaced(app: ServedApp, name: str, old_pid: int, old_family: list[int] = ()) -> None:
    """`name` runs as a new process and the old one is gone (killed and reaped by the launcher), with
    its engine process (old_family: the pids freeze() returned)."""
    app.on_server(wait_all_up(app.engine, RESTART_TIMEOUT_S), RESTART_TIMEOUT_S + 10)
    assert app.pid(name) != old_pid, f"{name} is up again but still as the old process {old_pid}"
    for pid in [old_pid, *old_family]:
        deadline = time.monotonic() + 10  # an orphaned engine process exits on its own, soon
        while process_state(pid) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.1)
        state = process_state(pid)
        assert state in (None, "Z"), f"process {pid} of the replaced {name} ({old_pid}) is still there (state {state})"


def freeze(pid: int) -> list[int]:
    """SIGSTOP an instance and its engine process, as a hung host freezes both; returns every pid stopped."""
    pids = [pid, *process_tree(pid)]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGSTOP)
    return pids


def kill_if_left(pids: list[int], signal_number: int = signal.SIGKILL) -> None:
    for pid in pids:
        if process_state(pid) not in (None, "Z"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal_number)


@contextlib.contextmanager
def stopped_until_exit(pid: int):
    """freeze(pid); on exit, SIGCONT what still exists (a scenario that failed half-way must not
    leave a frozen process behind)."""
    pids = freeze(pid)
    try:
        yield
    finally:
        kill_if_left(pids, signal.SIGCONT)


# ---- KV transfer counters, asked of the instances now (not the router's last poll) ----
def kv_counters(app: ServedApp, names: list[str] | None = None) -> dict[str, float]:
    """The KV transfer counters summed over the up instances (or those named)."""
    return app.on_server(_kv_counters(app.engine, names))


async def _kv_counters(client, names: list[str] | None) -> dict[str, float]:
    states = [s for s in client.pool.instances if s.up and (names is None or s.name in names)]
    replies = await asyncio.gather(*(s.client.stats() for s in states))
    totals: dict[str, float] = {}
    for reply in replies:
        for name, value in reply.transfer.items():
            totals[name] = totals.get(name, 0) + value
    return totals


def run_streams(app: ServedApp, streams: list) -> list:
    return asyncio.run(run_all(app.base_url, streams, REQUEST_TIMEOUT_S))
