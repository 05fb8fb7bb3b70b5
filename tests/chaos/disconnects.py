"""Clients that go away, in any mode: a disconnect storm, and a sweep over the moments the server is
admitting a request. This module holds no tests; each mode's module runs these on its deployment."""
from __future__ import annotations

import asyncio

from tests.chaos.support import REQUEST_TIMEOUT_S, ServedApp, assert_recovered
from tests.chaos.traffic import StormRequest, completion, leave_while_admitted, run_storm, storm, storm_problems
from tests.serving.test_disagg_support import make_prompts


def disconnect_storm(app: ServedApp, reference: tuple, num_requests: int, seed: int) -> None:
    """`num_requests` concurrent streams, about half of whose clients go away mid-stream: those that
    stay get well-formed, complete streams, no instance dies, and the deployment recovers."""
    requests = storm(app.model, num_requests, seed)
    _survive(app, reference, requests, num_requests // 3, run_storm(app.base_url, requests, REQUEST_TIMEOUT_S))


def admission_wave(app: ServedApp, reference: tuple, num_clients: int, seed: int) -> None:
    """`num_clients` clients, one after another, each leaving within 40 ms of sending (while the
    server admits its request) as 8 long streams keep the engines busy: the long streams finish
    well-formed, nothing the leavers had reserved stays behind, and the deployment recovers."""
    prompts = make_prompts(seed, [20] * num_clients + [30] * 8)
    leavers = [completion(app.model, p, 8) for p in prompts[:num_clients]]
    background = [completion(app.model, p, 300) for p in prompts[num_clients:]]
    requests = [StormRequest(s) for s in leavers + background]
    _survive(app, reference, requests, num_clients // 2,
             leave_while_admitted(app.base_url, leavers, 0.04, background, REQUEST_TIMEOUT_S))


def _survive(app: ServedApp, reference: tuple, requests: list[StormRequest], min_left: int, traffic) -> None:
    """Run `traffic` (a coroutine sending `requests`); then check the requests, that no instance
    died, and that the deployment recovers."""
    if app.disaggregated:
        pids = {s.name: s.launched.info.pid for s in app.engine._pool.instances}
        failures_before = app.engine.get_stats().extra["router"]["num_instance_failures_total"]
    asyncio.run(traffic)
    problems = storm_problems(requests)
    assert not problems, f"{len(problems)} of {len(requests)} requests went wrong: " + "; ".join(problems[:10])
    num_left = sum(r.stream.closed_early for r in requests)
    assert num_left >= min_left, f"only {num_left} of {len(requests)} clients went away: no storm"
    if app.disaggregated:
        router = app.engine.get_stats().extra["router"]
        assert router["num_instance_failures_total"] == failures_before, \
            f"instances failed under the disconnects: {router}"
        assert {s.name: s.launched.info.pid for s in app.engine._pool.instances} == pids, "an instance restarted"
    else:
        assert app.engine.is_healthy(), "the engine died under the disconnects"
    assert_recovered(app, reference)
