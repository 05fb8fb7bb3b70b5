"""Builders for simulator tests: instances on a synthetic latency model, Poisson workloads, leak checks."""
from __future__ import annotations

import random

from scheduler import SchedulerConfig
from scheduler.latency_model import LatencyModel, PhaseCoefficients
from scheduler.simulator import LinkSpec, SimConversation, SimDeployment, SimInstanceSpec, SimTurn, Simulator

MODEL = LatencyModel(PhaseCoefficients(0.010, 2e-5, 1e-9), PhaseCoefficients(0.008, 1e-6, 5e-4),
                     meta={"tp": 1, "pp": 1})
KV_BYTES_PER_TOKEN = 24 * 1024
NUM_LAYERS = 12


def instance(name: str, role: str, num_blocks: int = 4000, node: int = 0, model=MODEL, budget: int = 2048,
             max_num_seqs: int = 128, block_size: int = 16, max_model_len: int = 4096,
             prefix_caching: bool = True) -> SimInstanceSpec:
    return SimInstanceSpec(name, role, SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget),
                           num_blocks, block_size, max_model_len, model, KV_BYTES_PER_TOKEN, NUM_LAYERS, node,
                           enable_prefix_caching=prefix_caching)


def deployment(*instances: SimInstanceSpec, links: LinkSpec | None = None, **kwargs) -> SimDeployment:
    return SimDeployment(tuple(instances), links or LinkSpec(), **kwargs)


def poisson(num: int, rate: float, prompt=(100, 1000), output=(10, 300), seed: int = 0) -> list[SimConversation]:
    """`num` one-turn conversations; prompt/output lengths uniform in the ranges (a fixed int: fixed)."""
    rng = random.Random(seed)

    def draw(spec) -> int:
        return spec if isinstance(spec, int) else rng.randrange(*spec)

    now, conversations = 0.0, []
    for i in range(num):
        conversations.append(SimConversation(i, now, (SimTurn(draw(prompt), draw(output)),)))
        now += rng.expovariate(rate)
    return conversations


def run(deploy: SimDeployment, conversations: list[SimConversation]):
    """Simulate, check that every instance ends with every block back in its pool, return (sim, result)."""
    sim = Simulator(deploy)
    result = sim.run(conversations)
    assert_no_leaks(sim)
    return sim, result


def assert_no_leaks(sim: Simulator) -> None:
    for inst in sim.instances:
        inst.check_integrity()
        scheduler = inst.scheduler
        assert not scheduler.requests and not scheduler.held, f"{inst.name} still holds requests"
        assert scheduler.kv.pool.num_free_blocks == inst.spec.num_blocks, f"{inst.name} leaked blocks"
