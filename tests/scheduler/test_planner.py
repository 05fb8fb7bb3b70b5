"""The placement planner: on a small synthetic latency model where every deployment of a 4-device node
can be simulated, its choice is within 5% of the exhaustive optimum; bad inputs say what to change."""
import random

import pytest

from scheduler.latency_model import LatencyModel, PhaseCoefficients
from scheduler.latency_plans import LatencyModelSet
from scheduler.planner import ClusterSpec, ModelSetup, ModelShape, Planner, PlannerSettings, Unit
from scheduler.planner.cluster import ClusterSpec as Cluster
from scheduler.planner.instances import find_goodput
from scheduler.planner.placement import ANYWHERE
from scheduler.simulator import SimConversation, SimTurn

SHAPE = ModelShape("tiny", num_layers=4, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2,
                   head_dim=32, vocab_size=2048, max_position_embeddings=2048)
LATENCY = LatencyModelSet({(1, 1): LatencyModel(PhaseCoefficients(0.01, 2e-4, 1e-7),
                                                 PhaseCoefficients(0.015, 1e-6, 2e-3), meta={"tp": 1, "pp": 1})})
CLUSTER = ClusterSpec(nodes=1, devices_per_node=4, device_memory_gib=0.25, intra_node_bandwidth_gbps=100,
                      inter_node_bandwidth_gbps=10, device="cpu")
TTFT, TPOT = 0.5, 0.05


def workload(rate: float, num: int) -> list[SimConversation]:
    lengths, arrivals = random.Random(0), random.Random(1)
    now, out = 0.0, []
    for i in range(num):
        out.append(SimConversation(i, now, (SimTurn(lengths.randrange(100, 400), lengths.randrange(8, 32)),)))
        now += arrivals.expovariate(rate)
    return out


def attainment_for(ttft_slo: float, tpot_slo: float):
    def attainment(records) -> float:
        good = 0
        for r in records:
            if r.success:
                n = r.num_output_tokens
                tpot = (r.token_times_s[-1] - r.token_times_s[0]) / (n - 1) if n > 1 else 0.0
                good += r.token_times_s[0] - r.start_s <= ttft_slo and tpot <= tpot_slo
        return good / len(records)
    return attainment


def make_planner(cluster=CLUSTER, ttft=TTFT, tpot=TPOT, **settings) -> Planner:
    setup = ModelSetup(SHAPE, cluster, LATENCY, "float32", 16, 1024)
    options = dict(num_requests=120, verify_requests=600, tp_sizes=(1, 2), pp_sizes=(1,), rel_tol=0.03,
                   max_probes=10, max_instances_per_role=2)
    options.update(settings)
    return Planner(setup, PlannerSettings(ttft, tpot, **options), workload, attainment_for(ttft, tpot))


def all_units(planner: Planner) -> list[Unit]:
    """Every deployment of at most 4 devices and 2 instances per role: colocated replicas and
    n_p x prefill + n_d x decode."""
    plans = {(role, tp): planner.setup.instance_plan(role, tp, 1, planner.settings.scheduler)
             for role in ("colocated", "prefill", "decode") for tp in (1, 2)}
    units = [Unit("colocated", (plans[("colocated", tp)],), (1,), ANYWHERE) for tp in (1, 2)]
    for tp_p in (1, 2):
        for tp_d in (1, 2):
            for n_p in (1, 2):
                for n_d in (1, 2):
                    if n_p * tp_p + n_d * tp_d <= 4:
                        units.append(Unit("disaggregated", (plans[("prefill", tp_p)], plans[("decode", tp_d)]),
                                          (n_p, n_d), ANYWHERE))
    return units


def test_the_planners_choice_is_within_5_percent_of_the_exhaustive_optimum():
    planner = make_planner()
    result = planner.plan()
    placement = result.placement
    best_possible = 0.0
    for unit in all_units(planner):
        deployment = planner._deployment_of(unit, 1, placement)
        colocated = unit.kind == "colocated"
        estimate = planner._unit_estimate(unit, result.phases)  # as the planner starts its own bisections
        unit.goodput = planner._bisect(deployment, estimate, colocated, sum(unit.counts))
        best_possible = max(best_possible, unit.per_device)
    assert best_possible > 0
    assert result.best.per_device >= 0.95 * best_possible
    # the whole deployment is checked at (or, stepping down, near) the rate the units should sustain
    assert result.num_devices <= CLUSTER.num_devices
    assert result.verify_attainment >= 0.9 or result.verify_rate < result.best.goodput.rate * result.num_units
    assert result.best.goodput.bottleneck  # says where it breaks


def test_a_target_rate_sizes_the_deployment_and_an_impossible_one_is_refused():
    planner = make_planner(request_rate=0.5, tp_sizes=(1,), include_colocated=False)
    result = planner.plan()
    assert result.num_units == 1 and result.verify_rate == 0.5
    with pytest.raises(ValueError, match="cannot serve 1000 req/s"):
        make_planner(request_rate=1000.0, tp_sizes=(1,), include_colocated=False).plan()


def test_a_cluster_too_small_for_the_model_says_so():
    tiny = Cluster(nodes=1, devices_per_node=1, device_memory_gib=0.0001, intra_node_bandwidth_gbps=1,
                   inter_node_bandwidth_gbps=1)
    with pytest.raises(ValueError, match="no parallel plan can run tiny on this cluster.*more memory"):
        make_planner(cluster=tiny).plan()


def test_slos_no_plan_can_meet_say_so():
    with pytest.raises(ValueError, match="no plan meets the SLOs.*relax the SLOs"):
        make_planner(ttft=0.001, tpot=0.0001, max_probes=3).plan()


@pytest.mark.parametrize("values, message", [
    ({"nodes": 2}, "missing devices_per_node"),
    ({**vars(CLUSTER), "gpus": 8}, "unknown key.*gpus"),
    ({**vars(CLUSTER), "nodes": 0}, "nodes must be a whole number of at least 1"),
    ({**vars(CLUSTER), "device_memory_gib": "lots"}, "device_memory_gib must be a positive number"),
    ({**vars(CLUSTER), "device": "tpu"}, "device must be gpu or cpu"),
    ([1, 2], "expected a mapping"),
])
def test_bad_cluster_descriptions_say_what_to_change(values, message):
    with pytest.raises(ValueError, match=message):
        Cluster.from_dict(values)


def test_goodput_bisection_brackets_then_narrows():
    from scheduler.planner.instances import Probe
    result = find_goodput(lambda rate: Probe(rate, 1.0 if rate <= 3.3 else 0.5), 1.0, 0.9, rel_tol=0.01)
    assert 3.2 < result.rate <= 3.3 < result.upper
