"""Instances of a plan, as the simulator wants them, and the goodput search one plan gets.

An `InstancePlan` is one role at one TP x PP plan: its KV pool (from the device memory left after the
weights, scheduler/planner/sizing.py), its step latency (profiled or scaled, scheduler/latency_plans.py)
and its scheduler configuration. `find_goodput` bisects the highest rate whose simulated SLO
attainment meets the target.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from scheduler.config import SchedulerConfig
from scheduler.latency_plans import CommModel, LatencyModelSet
from scheduler.planner.cluster import ClusterSpec
from scheduler.planner.sizing import ModelShape, dtype_bytes, num_kv_blocks, plan_problem
from scheduler.simulator.spec import SimInstanceSpec


@dataclass(frozen=True)
class InstancePlan:
    role: str
    tp: int
    pp: int
    num_blocks: int
    latency: object
    latency_source: str  # "profiled" or how it was scaled
    scheduler: SchedulerConfig

    @property
    def num_devices(self) -> int:
        return self.tp * self.pp

    @property
    def label(self) -> str:
        return f"tp{self.tp}pp{self.pp}"


@dataclass(frozen=True)
class ModelSetup:
    """What every instance of the plan shares."""
    shape: ModelShape
    cluster: ClusterSpec
    latency: LatencyModelSet
    dtype: str
    block_size: int
    max_model_len: int
    enable_prefix_caching: bool = False

    def comm(self, tp: int, pp: int) -> CommModel:
        cluster = self.cluster
        pp_in_node = tp * pp <= cluster.devices_per_node
        return CommModel(self.shape.num_layers, self.shape.hidden_size, dtype_bytes(self.dtype),
                         cluster.intra_node_bytes_per_s,
                         cluster.intra_node_bytes_per_s if pp_in_node else cluster.inter_node_bytes_per_s)

    def instance_plan(self, role: str, tp: int, pp: int, scheduler: SchedulerConfig) -> InstancePlan | str:
        """The plan, or why it cannot run (a string)."""
        problem = plan_problem(self.shape, tp, pp, self.cluster.devices_per_node)
        if problem:
            return problem
        if tp * pp > self.cluster.num_devices:
            return f"tp={tp} pp={pp} needs {tp * pp} devices; the cluster has {self.cluster.num_devices}"
        blocks = num_kv_blocks(self.shape, tp, pp, self.cluster.device_memory_bytes,
                               self.cluster.memory_utilization, self.block_size, self.dtype)
        if blocks * self.block_size < self.max_model_len:
            weights_gib = self.shape.weight_bytes(self.dtype) / (tp * pp) / 1024**3
            return (f"tp={tp} pp={pp}: {weights_gib:.1f} GiB of weights per device leave room for "
                    f"{max(blocks, 0) * self.block_size} KV tokens, less than one {self.max_model_len}-token sequence")
        latency, source = self.latency.for_plan(tp, pp, self.comm(tp, pp))
        return InstancePlan(role, tp, pp, blocks, latency, source, scheduler)

    def spec(self, name: str, plan: InstancePlan, node: int = 0) -> SimInstanceSpec:
        return SimInstanceSpec(name, plan.role, plan.scheduler, plan.num_blocks, self.block_size, self.max_model_len,
                               plan.latency, self.shape.kv_bytes_per_token(self.dtype), self.shape.num_layers,
                               node, plan.tp, plan.pp, self.enable_prefix_caching)


@dataclass
class Probe:
    rate: float  # req/s offered to the whole simulated deployment
    attainment: float
    bottleneck: str = ""  # attribution at this rate (scheduler/planner/attribution.py)
    utilization: dict[str, float] = field(default_factory=dict)  # role -> mean busy share


@dataclass
class GoodputResult:
    rate: float  # highest passing rate (0: none passed)
    upper: float | None  # lowest failing rate
    probes: list[Probe]

    @property
    def bottleneck(self) -> str:
        failing = [p for p in self.probes if p.rate == self.upper]
        return failing[0].bottleneck if failing else "none found (no probed rate failed)"


def find_goodput(measure: Callable[[float], Probe], estimate: float, target: float, rel_tol: float = 0.05,
                 max_probes: int = 10) -> GoodputResult:
    """Bracket from `estimate` (doubling or halving), then bisect to rel_tol; at most max_probes runs.
    Assumes attainment falls as the rate rises."""
    probes: list[Probe] = []
    low, high = None, None
    rate = max(estimate, 1e-6)
    while len(probes) < max_probes and (low is None or high is None):
        probe = measure(rate)
        probes.append(probe)
        if probe.attainment >= target:
            low = rate
            rate = rate * 2
        else:
            high = rate
            rate = rate / 2
        if rate < 1e-6:
            break
    while low is not None and high is not None and high - low > rel_tol * low and len(probes) < max_probes:
        mid = (low + high) / 2
        probe = measure(mid)
        probes.append(probe)
        if probe.attainment >= target:
            low = mid
        else:
            high = mid
    return GoodputResult(low or 0.0, high, probes)
