"""Step traces (scheduler/step_trace.py): what an engine records per step, reading traces back, and the
latency model fitted from them."""
import json
import random

import pytest

from kvcache.block_pool import BlockPool
from kvcache.kv_manager import KVCacheManager
from scheduler import EngineCore, Request, SamplingParams, Scheduler, SchedulerConfig, VirtualClock
from scheduler import step_trace
from scheduler.latency_executor import LatencyModelExecutor
from scheduler.latency_model import LatencyModel, PhaseCoefficients

# a prefill intercept above the decode one, and one below (the mixed step's shared overhead is the smaller)
MODELS = [LatencyModel(PhaseCoefficients(0.012, 2e-5, 1e-9), PhaseCoefficients(0.008, 1e-6, 5e-4)),
          LatencyModel(PhaseCoefficients(0.004, 3e-5, 2e-9), PhaseCoefficients(0.009, 2e-6, 7e-4))]


def traced_run(model: LatencyModel, path, num_requests=120, seed=0, budget=256):
    """A colocated engine core on the latency-model executor, tracing every step; requests arrive over
    time so steps are pure prefill, pure decode and mixed."""
    clock = VirtualClock()
    kv = KVCacheManager(BlockPool(800), 16)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=budget), kv, 4096, clock=clock)
    trace = step_trace.StepTrace(path)
    core = EngineCore(scheduler, LatencyModelExecutor(model, token_id=3, clock=clock), clock, trace)
    rng = random.Random(seed)
    pending = [Request(f"r{i}", [rng.randrange(5, 900) for _ in range(rng.randrange(1, 600))],
                       SamplingParams(max_tokens=rng.randrange(1, 30), ignore_eos=True), arrival_time=0.0)
               for i in range(num_requests)]
    steps = 0
    while pending or core.has_unfinished():
        if pending and (steps % 7 == 0 or not core.has_unfinished()):
            core.add_request(pending.pop())
        core.step()
        steps += 1
    trace.close()
    return core, trace


@pytest.mark.parametrize("model", MODELS, ids=["prefill-a-above", "prefill-a-below"])
def test_a_trace_of_modelled_steps_fits_back_the_model(tmp_path, model):
    core, trace = traced_run(model, tmp_path / "colocated-1.jsonl")
    steps = step_trace.read([tmp_path])
    assert len(steps) == trace.num_steps > 0
    assert sum(s.seconds for s in steps) == pytest.approx(core.executor.busy_seconds, rel=1e-5)
    kinds = {(bool(s.prefill), bool(s.decode)) for s in steps}
    assert kinds == {(True, False), (False, True), (True, True)}  # pure prefill, pure decode and mixed
    fitted = step_trace.fit(steps, meta={"note": "x"})
    for phase in ("prefill", "decode"):
        want, got = getattr(model, phase), getattr(fitted, phase)
        assert (got.a, got.b, got.c) == pytest.approx((want.a, want.b, want.c), rel=1e-3, abs=1e-9), phase
    assert fitted.meta["note"] == "x" and fitted.meta["num_mixed_steps"] > 0


def test_steps_are_classified_as_the_latency_executor_prices_them(tmp_path):
    model = MODELS[0]
    _, _ = traced_run(model, tmp_path / "t.jsonl", num_requests=30, seed=1)
    for step in step_trace.read([tmp_path / "t.jsonl"]):
        expected = 0.0
        if step.prefill:
            expected += model.prefill_time(list(step.prefill))
        if step.decode:
            expected += model.decode_time(list(step.decode))
        if step.prefill and step.decode:
            expected -= min(model.prefill.a, model.decode.a)
        assert step.seconds == pytest.approx(expected, rel=1e-5)


def test_reading_skips_a_torn_last_line_and_names_a_bad_one(tmp_path):
    good = {"t": 10.0, "s": 0.01, "prefill": [5], "decode": []}
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "t": 20.0}) + "\n" + '{"t": 30.0, "s": 0.0')
    assert [s.started for s in step_trace.read([path])] == [10.0, 20.0]
    assert [s.started for s in step_trace.read([path], since=15.0)] == [20.0]
    assert [s.started for s in step_trace.read([path], until=15.0)] == [10.0]
    path.write_text(json.dumps(good) + "\n" + "not json\n" + json.dumps(good) + "\n")
    with pytest.raises(ValueError, match=r"a.jsonl:2: not a step trace line"):
        step_trace.read([path])


def test_fitting_says_which_phase_has_too_few_steps(tmp_path):
    only_prefill = [step_trace.TracedStep(float(i), 0.01 * (i + 1), (16 * (i + 1),), ()) for i in range(20)]
    with pytest.raises(ValueError, match="0 pure decode steps in the trace; the fit needs 8"):
        step_trace.fit(only_prefill)
    only_decode = [step_trace.TracedStep(float(i), 0.01, (), (100 + i, 50)) for i in range(20)]
    with pytest.raises(ValueError, match="0 steps with prefill in the trace"):
        step_trace.fit(only_decode)


# a pipelined engine: the lone plan's latency, and the busiest stage's hold (the engine's own work on
# stage 0 can outlast its share of the latency)
LATENCY = MODELS[0]
HOLD = LatencyModel(PhaseCoefficients(0.006, 1.1e-5, 6e-10), PhaseCoefficients(0.018, 5e-7, 3e-4))
HAND_OFFS = 0.002  # per plan, between the stages: in a lone plan's latency, in no stage's work


def _pipelined_steps(num_plans=300, seed=0, lone_every=4):
    """Plans as a pipelined engine traces them: pure prefill, pure decode and mixed; every lone_every-th
    alone (its latency is its own: its work and the hand-offs), the others waiting behind earlier plans
    (their `s` longer); every tenth without a hold (the engine went idle before the next submit)."""
    rng = random.Random(seed)
    steps = []
    for i in range(num_plans):
        kind = i % 3
        prefill = tuple(rng.randrange(8, 400) for _ in range(rng.randrange(1, 3))) if kind != 1 else ()
        decode = tuple(rng.randrange(20, 900) for _ in range(rng.randrange(1, 8))) if kind != 0 else ()
        def seconds(model):
            t = model.prefill_time(list(prefill)) if prefill else 0.0
            t += model.decode_time(list(decode)) if decode else 0.0
            return t - (min(model.prefill.a, model.decode.a) if prefill and decode else 0.0)
        alone = i % lone_every == 0
        latency = seconds(LATENCY) + (0.0 if alone else rng.uniform(0.001, 0.05))
        steps.append(step_trace.TracedStep(float(i), latency, prefill, decode,
                                           None if i % 10 == 9 else seconds(HOLD), alone,
                                           seconds(LATENCY) - HAND_OFFS))
    return steps


def test_a_pipelined_trace_fits_the_lone_latency_and_the_stage_hold(tmp_path):
    path = tmp_path / "colocated-1.jsonl"
    trace = step_trace.StepTrace(path)
    for step in _pipelined_steps():  # written and read back as the engine writes them
        trace.record(step.started, step.seconds, list(step.prefill), list(step.decode), step.hold, step.alone,
                     step.work)
    trace.close()
    steps = step_trace.read([path])
    want = _pipelined_steps()
    assert [(s.prefill, s.decode, s.alone, s.hold is None, s.work is None) for s in steps] == \
        [(s.prefill, s.decode, s.alone, s.hold is None, False) for s in want]
    for field in ("seconds", "hold", "work"):  # written to the 0.1 µs
        assert [getattr(s, field) or 0.0 for s in steps] == pytest.approx([getattr(s, field) or 0.0 for s in want],
                                                                          abs=1e-7)
    assert step_trace.is_pipelined(steps)
    fitted = step_trace.fit_pipelined(steps, meta={"pp": 2})
    stage = fitted.stage_model()
    for want, got in ((LATENCY, fitted), (HOLD, stage)):
        for phase in ("prefill", "decode"):
            w, g = getattr(want, phase), getattr(got, phase)
            assert (g.a, g.b, g.c) == pytest.approx((w.a, w.b, w.c), rel=1e-3, abs=1e-9), phase
    assert fitted.meta["pp"] == 2 and fitted.meta["num_alone_plans"] == 75 and fitted.meta["num_held_plans"] == 270
    assert fitted.meta["hand_off_seconds"] == pytest.approx(HAND_OFFS, abs=1e-6)
    # the plans' latencies as the engine saw them include waits behind other plans: fitted, they are off
    every = step_trace.fit(steps)
    assert every.decode.a > LATENCY.decode.a * 1.2


def test_a_pipelined_fit_says_what_is_missing():
    serial = [step_trace.TracedStep(s.started, s.seconds, s.prefill, s.decode) for s in _pipelined_steps()]
    with pytest.raises(ValueError, match="not traced by a pipelined engine"):
        step_trace.fit_pipelined(serial)
    few = [s for s in _pipelined_steps() if s.prefill][:5] + [s for s in _pipelined_steps() if not s.prefill]
    with pytest.raises(ValueError, match="of the plans with a traced work: 5 steps with prefill"):
        step_trace.fit_pipelined(few)


def test_profile_fits_a_pipelined_trace_only_when_told_its_stages(tmp_path, capsys):
    from bench.profile import main as profile_main
    path = tmp_path / "colocated-1.jsonl"
    trace = step_trace.StepTrace(path)
    for step in _pipelined_steps():
        trace.record(step.started, step.seconds, list(step.prefill), list(step.decode), step.hold, step.alone,
                     step.work)
    trace.close()
    out = tmp_path / "lat.json"
    assert profile_main(["--from-trace", str(path), "--out", str(out)]) == 2
    assert "give --pipeline-parallel-size" in capsys.readouterr().err
    assert profile_main(["--from-trace", str(path), "--pipeline-parallel-size", "2", "--out", str(out)]) == 0
    fitted = LatencyModel.load(str(out))
    assert fitted.meta["pp"] == 2 and fitted.stage_model().decode.a == pytest.approx(HOLD.decode.a, rel=1e-3)
    assert "the busiest stage holds a plan" in capsys.readouterr().out


def test_a_trace_that_cannot_be_written_turns_itself_off(tmp_path):
    trace = step_trace.StepTrace(tmp_path / "t.jsonl")
    trace._file.close()  # what a vanished disk looks like to the writer: every write fails
    trace.record(1.0, 0.01, [5], [])
    assert trace.error and "stopped" in trace.error
    trace.record(2.0, 0.01, [5], [])  # and it stays quiet, never raising into the engine loop


def test_a_serving_engine_traces_its_steps_and_profile_fits_them(tiny_model_dir, tmp_path, capsys):
    """A real engine (the tiny model) with step_trace_dir: its prefill chunks cover every prompt token,
    its decode rows every generated token but each request's first; `pdserve profile --from-trace` fits."""
    import os

    from bench.profile import main as profile_main
    from serving.llm import LLM

    llm = LLM(tiny_model_dir, step_trace_dir=str(tmp_path / "trace"), max_num_batched_tokens=64,
              enable_prefix_caching=False)
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 500) for _ in range(rng.randrange(3, 150))] for _ in range(24)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for i in range(0, len(prompts), 6):  # waves: pure prefill, mixed and pure decode steps
        llm.generate(prompts[i:i + 6], params)
    llm.engine.close()
    files = list((tmp_path / "trace").glob("*.jsonl"))
    assert [f.name for f in files] == [f"colocated-{os.getpid()}.jsonl"]
    steps = step_trace.read(files)
    assert sum(sum(s.prefill) for s in steps) == sum(len(p) for p in prompts)
    assert sum(len(s.decode) for s in steps) == len(prompts) * (6 - 1)
    assert all(s.seconds > 0 for s in steps) and max(max(s.prefill, default=0) for s in steps) <= 64
    out = tmp_path / "lat.json"
    assert profile_main(["--from-trace", str(tmp_path / "trace"), "--out", str(out)]) == 0
    fitted = LatencyModel.load(str(out))
    assert fitted.meta["source"] == "step trace" and fitted.decode.a > 0
    assert "traced steps" in capsys.readouterr().out
    assert profile_main(["--from-trace", str(tmp_path / "missing"), "--out", str(out)]) == 2
