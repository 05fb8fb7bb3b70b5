"""RayLauncher._connect: a local Ray head whose GCS server does not come up in time is started once more
(a stand-in `ray` module counts the calls); other errors, and a second timeout, are raised."""
import pytest

from serving.config import DeployConfig
from serving.launchers.ray import RayLauncher


class FakeRay:
    def __init__(self, errors):
        self.errors = list(errors)
        self.inits = 0
        self.shutdowns = 0

    def is_initialized(self):
        return False

    def init(self, **kwargs):
        self.inits += 1
        if self.errors:
            raise self.errors.pop(0)

    def shutdown(self):
        self.shutdowns += 1


def _launcher(fake):
    launcher = RayLauncher(DeployConfig())
    launcher._ray = fake
    return launcher


def test_a_gcs_start_timeout_is_retried_once():
    fake = FakeRay([RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_y")])
    launcher = _launcher(fake)
    launcher._connect(2)
    assert fake.inits == 2 and fake.shutdowns == 1 and launcher._connected_here


def test_a_second_timeout_and_other_errors_are_raised():
    timeout = RuntimeError("Timed out waiting for file gcs_server_port")
    fake = FakeRay([timeout, timeout])
    with pytest.raises(RuntimeError, match="Timed out"):
        _launcher(fake)._connect(2)
    assert fake.inits == 2
    fake = FakeRay([RuntimeError("something else")])
    with pytest.raises(RuntimeError, match="something else"):
        _launcher(fake)._connect(2)
    assert fake.inits == 1
