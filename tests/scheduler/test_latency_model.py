import math
import random

import numpy as np
import pytest

from scheduler.latency_model import LatencyModel, PhaseCoefficients, fit_decode, fit_prefill


def test_fit_recovers_known_coefficients(tmp_path):
    rng = random.Random(0)
    true_p = (0.01, 2e-4, 3e-8)
    true_d = (0.005, 1e-6, 4e-4)
    prefill = [[rng.randrange(16, 2048) for _ in range(rng.randrange(1, 4))] for _ in range(40)]
    decode = [[rng.randrange(16, 4096) for _ in range(rng.randrange(1, 64))] for _ in range(40)]
    p_s = [true_p[0] + true_p[1] * sum(b) + true_p[2] * sum(x * x for x in b) for b in prefill]
    d_s = [true_d[0] + true_d[1] * sum(b) + true_d[2] * len(b) for b in decode]
    model = LatencyModel(fit_prefill(prefill, p_s), fit_decode(decode, d_s), {"model": "synthetic"})
    for got, want in zip((model.prefill.a, model.prefill.b, model.prefill.c), true_p):
        assert got == pytest.approx(want, rel=1e-6)
    for got, want in zip((model.decode.a, model.decode.b, model.decode.c), true_d):
        assert got == pytest.approx(want, rel=1e-6)
    assert model.prefill.r2 == pytest.approx(1.0)
    path = tmp_path / "lat.json"
    model.save(str(path))
    loaded = LatencyModel.load(str(path))
    assert loaded == model
    assert loaded.prefill_time([100, 200]) == pytest.approx(true_p[0] + true_p[1] * 300 + true_p[2] * 50000)
    assert loaded.decode_time([10, 20, 30]) == pytest.approx(true_d[0] + true_d[1] * 60 + true_d[2] * 3)


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="pdserve profile"):
        LatencyModel.load(str(path))


def test_profile_command_writes_a_usable_model(tiny_model_dir, tmp_path):
    from bench.profile import main
    out = tmp_path / "latency.json"
    assert main(["--model", tiny_model_dir, "--quick", "--repeats", "1", "--out", str(out)]) == 0
    model = LatencyModel.load(str(out))
    assert isinstance(model.prefill, PhaseCoefficients)
    assert len(model.meta["prefill_samples"]) >= 4 and len(model.meta["decode_samples"]) >= 4
    assert all(s > 0 for _, s in model.meta["prefill_samples"] + model.meta["decode_samples"])
    assert math.isfinite(model.prefill_time([256])) and math.isfinite(model.decode_time([64, 64]))
    swap = model.swap_cost()  # timed through the engine's swap worker
    assert swap.bytes_per_s > 0 and swap.seconds_per_copy >= 0
    assert model.meta["swap"]["samples"]["single_blocks_s"] > 0


def test_the_fit_weighs_relative_error_so_short_steps_are_not_lost_to_long_ones():
    # one long profiled step 40% slower than the model (noise on a loaded box) must not drag the short
    # steps, which make up most of a serving run, off by much
    true = (0.040, 1e-5, 4e-3)
    batches = [[128] * b for b in (1, 1, 2, 4, 8, 16, 32)] + [[128] * 64]
    seconds = [true[0] + true[1] * sum(b) + true[2] * len(b) for b in batches]
    seconds[-1] *= 1.4
    fit = fit_decode(batches, seconds)
    one_row = fit.a + fit.b * 128 + fit.c
    assert one_row == pytest.approx(seconds[0], rel=0.05)


def test_the_fit_prices_the_mean_step_of_right_skewed_served_steps():
    """Served steps are now and then much slower than usual (here: lognormal noise, sigma 0.3). The fit
    must price their mean, which sets how fast a queue grows, not their typical (median-like) value:
    fitted on one run, it predicts the total busy time of a second run of the same steps."""
    rng = np.random.default_rng(0)
    true = (0.030, 2e-6, 3e-3)

    def served(num):
        batches = [[int(rng.integers(100, 600))] * int(rng.integers(1, 9)) for _ in range(num)]
        clean = np.array([true[0] + true[1] * sum(b) + true[2] * len(b) for b in batches])
        return batches, clean * rng.lognormal(0.0, 0.3, num)

    batches, seconds = served(3000)
    fit = fit_decode(batches, list(seconds))
    fresh, fresh_seconds = served(3000)
    predicted = sum(fit.a + fit.b * sum(b) + fit.c * len(b) for b in fresh)
    assert predicted / fresh_seconds.sum() == pytest.approx(1.0, abs=0.02)
    # relative least squares alone (what the fit starts from) is several percent low on such steps
    features = np.array([[1.0, sum(b), len(b)] for b in batches])
    weights = 1.0 / seconds
    raw, *_ = np.linalg.lstsq(features * weights[:, None], seconds * weights, rcond=None)
    raw_predicted = sum(raw[0] + raw[1] * sum(b) + raw[2] * len(b) for b in fresh)
    assert raw_predicted / fresh_seconds.sum() < 0.95


def test_profile_command_profiles_tensor_and_pipeline_parallel_plans_into_a_set(tiny_model_dir, tmp_path):
    """--tensor-parallel-size and --pipeline-parallel-size run the real ranks; the set then serves those
    plans as profiled, not scaled."""
    from bench.profile import main
    from scheduler.latency_plans import LatencyModelSet
    assert main(["--model", tiny_model_dir, "--quick", "--repeats", "1", "--out", f"{tmp_path}/"]) == 0
    assert main(["--model", tiny_model_dir, "--quick", "--repeats", "1", "--tensor-parallel-size", "2",
                 "--out", f"{tmp_path}/"]) == 0
    assert main(["--model", tiny_model_dir, "--quick", "--repeats", "1", "--pipeline-parallel-size", "2",
                 "--out", f"{tmp_path}/"]) == 0
    models = LatencyModelSet.load([str(tmp_path)])
    assert models.plans == [(1, 1), (1, 2), (2, 1)]
    for tp, pp in ((2, 1), (1, 2)):
        plan, source = models.for_plan(tp, pp)
        assert source == "profiled" and (plan.meta["tp"], plan.meta["pp"]) == (tp, pp)
        assert all(s > 0 for _, s in plan.meta["prefill_samples"] + plan.meta["decode_samples"])
        assert math.isfinite(plan.prefill_time([256])) and math.isfinite(plan.decode_time([64, 64]))


def test_a_serial_engines_trace_is_not_fitted_as_a_pipelines(tmp_path, capsys):
    from bench.profile import main
    from scheduler.step_trace import StepTrace
    trace = StepTrace(tmp_path / "colocated-1.jsonl")
    for i in range(20):
        trace.record(float(i), 0.01, [16 * (i + 1)] if i % 2 else [], [] if i % 2 else [100, 50])
    trace.close()
    assert main(["--from-trace", str(tmp_path), "--pipeline-parallel-size", "2", "--out", f"{tmp_path}/x.json"]) == 2
    assert "not traced by a pipelined engine" in capsys.readouterr().err
