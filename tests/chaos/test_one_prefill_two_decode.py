"""Chaos against 1P2D: one prefill and two decode instance processes (local launcher) behind the real
HTTP server. Scenarios share one deployment (a fresh one after a scenario that left it broken), the
destructive ones last; each ends with `assert_recovered`."""
from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tests.chaos.disconnects import admission_wave, disconnect_storm
from tests.chaos.support import (REQUEST_TIMEOUT_S, Deployment, assert_recovered, assert_replaced,
                                 chaos_config, freeze, greedy_probe, kill_if_left)
from serving.launchers.local import process_tree
from tests.chaos.traffic import (Stream, assert_victims_failed_cleanly, completion, each_has,
                                 strike_mid_stream)
from tests.serving.test_disagg_support import make_prompts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def deployment(tiny_model_dir):
    deployment = Deployment(chaos_config(tiny_model_dir, mode="disaggregated", num_decode=2))
    yield deployment
    deployment.close()


@pytest.fixture
def app(deployment):
    return deployment.app()


@pytest.fixture(scope="module")
def reference(deployment):
    return greedy_probe(deployment.app())


def test_disconnect_storm(app, reference):
    disconnect_storm(app, reference, num_requests=160, seed=2)


def test_clients_leaving_while_admitted(app, reference):
    admission_wave(app, reference, num_clients=80, seed=12)


def _strike_decode(app, victim: str, signal_number: int) -> tuple[int, list[Stream], list[int]]:
    """Long greedy streams spread over both decode instances; once each has a few tokens, strike
    `victim`: SIGSTOP freezes the instance and its engine process (a hung host), SIGKILL kills the
    instance process alone (its engine process must notice and exit). Returns how many streams the
    victim held, the streams, and the victim's pids (instance first)."""
    # long enough that the victim is still generating when struck: the tiny model can generate a short
    # reply whole (held in the router's stream buffers) before a client on a loaded box has read 3 chunks
    streams = [completion(app.model, p, 600) for p in make_prompts(11, [20, 35, 50, 65, 80, 95])]
    holders, family = [], []

    def strike() -> None:
        holders.append(app.instance(victim).num_active)
        pid = app.pid(victim)
        if signal_number == signal.SIGSTOP:
            family.extend(freeze(pid))
        else:
            family.extend([pid, *process_tree(pid)])
            os.kill(pid, signal_number)

    asyncio.run(strike_mid_stream(app.base_url, streams, each_has(streams, 3), strike, REQUEST_TIMEOUT_S))
    return holders[0], streams, family


def test_sigstop_decode_mid_stream_is_replaced(app, reference):
    """A decode instance that stops answering (SIGSTOP, never continued) is found by the health check:
    its streams end with an error, the others finish, and the launcher kills it and starts a new one."""
    victim = "decode-1"
    old_pid = app.pid(victim)
    family: list[int] = []
    try:
        holders, streams, family = _strike_decode(app, victim, signal.SIGSTOP)
        assert_victims_failed_cleanly(streams, holders, victim)
        assert_replaced(app, victim, old_pid, family)
    finally:
        kill_if_left(family or [old_pid])  # the launcher did not: leave nothing frozen behind
    assert_recovered(app, reference)


def test_kill_9_decode_mid_stream_is_restarted(app, reference):
    victim = "decode-0"
    old_pid = app.pid(victim)
    holders, streams, family = _strike_decode(app, victim, signal.SIGKILL)
    assert_victims_failed_cleanly(streams, holders, victim)
    assert_replaced(app, victim, old_pid, family)
    assert_recovered(app, reference)
