"""Chaos in colocated mode: one AsyncLLM behind the real HTTP server."""
from __future__ import annotations

import pytest

from tests.chaos.disconnects import admission_wave, disconnect_storm
from tests.chaos.support import Deployment, chaos_config, greedy_probe

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def deployment(tiny_model_dir):
    deployment = Deployment(chaos_config(tiny_model_dir))
    yield deployment
    deployment.close()


@pytest.fixture
def app(deployment):
    return deployment.app()


@pytest.fixture(scope="module")
def reference(deployment):
    return greedy_probe(deployment.app())


def test_disconnect_storm(app, reference):
    disconnect_storm(app, reference, num_requests=160, seed=1)


def test_clients_leaving_while_admitted(app, reference):
    admission_wave(app, reference, num_clients=80, seed=11)
