"""What every launcher hands the router: instances started from specs, each a `LaunchedInstance`.

`local` (local.py) runs each instance as a subprocess of the API server; `ray` (ray.py) runs each as a
Ray actor. Both hand back the same `LaunchedInstance`, so the router cannot tell them apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from serving.config import Config
from serving.instance._proto import instance_pb2 as pb
from serving.instance.servicer import InstanceSpec, linger_s

# how long a stopped instance may take beyond its own drain before it is killed
STOP_GRACE_S = 10.0


def stop_budget_s(config: Config) -> float:
    """How long a launcher lets a stopped instance take before it kills it: its drain (--shutdown-timeout),
    its wait for the router to hear that it drained (servicer.linger_s) and a grace for the rest."""
    return config.server.shutdown_timeout_s + linger_s(config) + STOP_GRACE_S


@dataclass(frozen=True)
class LaunchedInstance:
    spec: InstanceSpec
    address: str  # host:port of its Instance service
    info: pb.InstanceInfo

    @property
    def name(self) -> str:
        return self.spec.name


class Launcher(Protocol):
    def start(self, specs: list[InstanceSpec]) -> list[LaunchedInstance]:
        """Start every instance (concurrently) and wait until all serve; raises RuntimeError naming
        the instance that failed (and stops the others)."""

    async def restart(self, spec: InstanceSpec) -> LaunchedInstance:
        """Start a dead (or hung) instance again under the same name; new addresses."""

    def shutdown(self) -> None:
        """Stop every instance (and what the launcher started for them). Idempotent."""


def make_specs(config: Config, token: str | None = None) -> list[InstanceSpec]:
    """prefill-0..N-1 and decode-0..M-1 (colocated: replica-0..R-1), each with its role's config
    overrides applied, without the API key (instances never need it), and with the deployment's token
    (None: instances refuse to start)."""
    deploy = config.deploy
    config = config.replace(api_key=None)
    if deploy.mode == "colocated":
        return [InstanceSpec(f"replica-{i}", "colocated", config, token) for i in range(deploy.num_replicas)]
    prefill = config.replace(**deploy.prefill_overrides) if deploy.prefill_overrides else config
    decode = config.replace(**deploy.decode_overrides) if deploy.decode_overrides else config
    return ([InstanceSpec(f"prefill-{i}", "prefill", prefill, token) for i in range(deploy.num_prefill)]
            + [InstanceSpec(f"decode-{i}", "decode", decode, token) for i in range(deploy.num_decode)])
