"""Latency of a TP x PP plan: a profiled fit as is, else the documented scaling rule."""
import pytest

from scheduler.latency_model import LatencyModel, PhaseCoefficients
from scheduler.latency_plans import CommModel, LatencyModelSet, PlanLatency, save_set

BASE = LatencyModel(PhaseCoefficients(0.01, 1e-4, 1e-8), PhaseCoefficients(0.02, 1e-6, 1e-3), meta={"tp": 1, "pp": 1})


def test_tensor_parallel_divides_the_variable_terms_and_keeps_the_fixed_one():
    tp2 = PlanLatency(BASE, tp=2)
    work = 1e-4 * 300 + 1e-8 * (100**2 + 200**2)
    assert tp2.prefill_time([100, 200]) == pytest.approx(0.01 + work / 2)
    assert tp2.decode_time([500] * 4) == pytest.approx(0.02 + (1e-6 * 2000 + 1e-3 * 4) / 2)


def test_all_reduces_cost_latency_per_step_and_bytes_per_token():
    comm = CommModel(num_layers=10, hidden_size=1000, dtype_bytes=2, tp_bytes_per_s=1e9, pp_bytes_per_s=1e8,
                     allreduce_latency_s=1e-5, p2p_latency_s=2e-5)
    tp4 = PlanLatency(BASE, tp=4, comm=comm)
    no_comm = PlanLatency(BASE, tp=4)
    collectives = 2 * 10
    per_token = collectives * 2 * 3 / 4 * 1000 * 2 / 1e9
    assert tp4.prefill_time([100]) - no_comm.prefill_time([100]) == pytest.approx(collectives * 1e-5 + 100 * per_token)
    pp2 = PlanLatency(BASE, pp=2, comm=comm)
    assert pp2.decode_time([10] * 8) - PlanLatency(BASE, pp=2).decode_time([10] * 8) == \
        pytest.approx(2e-5 + 8 * 1000 * 2 / 1e8)


def test_a_plan_through_pipeline_stages_costs_its_whole_work_alone():
    """Plans in flight (the latency-model executor) are where pipelining gains; one plan through the
    stages costs the base's latency plus the hops (tests/scheduler/test_engine_core.py has the overlap)."""
    pp4 = PlanLatency(BASE, pp=4)
    assert pp4.prefill_time([1000]) == pytest.approx(BASE.prefill_time([1000]))
    assert pp4.prefill_time([100] * 8) == pytest.approx(BASE.prefill_time([100] * 8))
    assert pp4.decode_time([50, 50]) == pytest.approx(BASE.decode_time([50, 50]))


def test_a_set_uses_profiled_plans_as_they_are_and_scales_the_rest(tmp_path):
    tp2 = LatencyModel(PhaseCoefficients(0.012, 6e-5, 5e-9), PhaseCoefficients(0.021, 6e-7, 6e-4),
                       meta={"tp": 2, "pp": 1})
    paths = save_set([BASE, tp2], str(tmp_path))
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["latency-tp1-pp1.json", "latency-tp2-pp1.json"]
    models = LatencyModelSet.load([str(tmp_path)])
    assert models.plans == [(1, 1), (2, 1)]
    exact, source = models.for_plan(2, 1)
    assert exact.prefill_time([100]) == tp2.prefill_time([100]) and source == "profiled"
    scaled, source = models.for_plan(8, 2)
    assert isinstance(scaled, PlanLatency) and scaled.base_tp == 2 and "scaled from tp=2" in source
    assert scaled.prefill_time([100] * 2) == pytest.approx(0.012 + (6e-5 * 200 + 5e-9 * 2e4) * 2 / 8)


def test_bad_sets_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="pdserve profile"):
        LatencyModelSet.load([str(tmp_path / "missing.json")])
    BASE.save(str(tmp_path / "a.json"))
    BASE.save(str(tmp_path / "b.json"))
    with pytest.raises(ValueError, match="two latency models for tp=1 pp=1"):
        LatencyModelSet.load([str(tmp_path)])
    only_tp2 = LatencyModelSet({(2, 1): BASE})
    with pytest.raises(ValueError, match="profile a plan with pp=1"):
        only_tp2.for_plan(3, 1)
