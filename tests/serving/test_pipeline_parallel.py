"""Pipeline parallelism (serving/models/pipeline.py, the stages in serving/runner/tensor_parallel.py,
the batch queue in scheduler/engine_core.py): real rank processes, the hidden state passed stage to
stage over gloo. Greedy output with PP > 1, and with TP x PP, equals one rank on the same weights;
the stages really overlap plans; a dead stage takes its engine down cleanly."""
from __future__ import annotations

import os
import signal

import pytest

from scheduler.errors import ExecutorDeadError
from serving.config import ParallelConfig
from serving.llm import LLM
from serving.models.pipeline import PipelineStage, check_pipeline_parallel, layer_partition
from tests.serving.test_disagg_support import children_running
from tests.serving.test_tensor_parallel import (TP_WORKER, assert_native_equals_eager,  # noqa: F401
                                                assert_same_generation, case_dirs, greedy, run)


@pytest.mark.parametrize("case", ["llama3-rope-scaling", "llama-tied-bias", "qwen2-qkv-bias", "qwen3-qk-norm"])
@pytest.mark.parametrize("pp", [2, 3])
def test_greedy_output_with_pipeline_stages_equals_one_rank(case_dirs, tiny_model_dir, case, pp):  # noqa: F811
    """3 layers: stages of 2 and 1 layers (pp 2), one each (pp 3); a tied LM head on a last stage
    that does not hold the embedding."""
    model_dir = case_dirs[case]
    assert_same_generation(run(model_dir, 1, tokenizer=tiny_model_dir),
                           run(model_dir, 1, tokenizer=tiny_model_dir, pipeline_parallel_size=pp))


@pytest.mark.parametrize("tp, pp", [(1, 2), (1, 4), (2, 2)])
def test_the_built_in_tiny_model_with_pipeline_stages_and_tensor_parallel_ranks(tiny_model_dir, tp, pp):
    assert_same_generation(run(tiny_model_dir, 1), run(tiny_model_dir, tp, pipeline_parallel_size=pp))


@pytest.mark.parametrize("partition", ["3,1", "1,3"])
def test_a_layer_partition_of_the_stages_changes_nothing_but_where_the_layers_are(tiny_model_dir, partition):
    """--pp-layer-partition: rank 0 holds its share of the layers (and their KV) only; the output
    is one rank's."""
    expected = run(tiny_model_dir, 1)
    llm = LLM(tiny_model_dir, pipeline_parallel_size=2, pp_layer_partition=partition)
    try:
        first = int(partition.split(",")[0])
        assert llm.engine.runner.stage == PipelineStage(0, tuple(int(n) for n in partition.split(",")))
        assert llm.engine.runner.kv_cache.shape[0] == first
        assert llm.engine.kv_layout.pp_partition == (first, 4 - first)
    finally:
        llm.engine.close()
    assert_same_generation(expected, run(tiny_model_dir, 1, pipeline_parallel_size=2, pp_layer_partition=partition))


def test_a_layer_partition_that_does_not_fit_says_what_to_give(tiny_model_dir):
    with pytest.raises(ValueError, match=r"--pp-layer-partition '3,1,1': give the layers of each of the 2 pipeline"):
        LLM(tiny_model_dir, pipeline_parallel_size=2, pp_layer_partition="3,1,1")
    with pytest.raises(ValueError, match=r"--pp-layer-partition 3,2: give 2 stage sizes .* add up to the model's 4 "
                                         r"layers, e.g. 2,2"):
        LLM(tiny_model_dir, pipeline_parallel_size=2, pp_layer_partition="3,2")


def test_chunked_prefill_and_preemption_across_stages_in_flight(tiny_model_dir):
    """Small steps and a small pool: a prompt's chunks in consecutive plans in flight at once, mixed
    steps, preemption; every block back in the pool."""
    changes = dict(max_num_batched_tokens=16, num_gpu_blocks_override=24, block_size=4, max_model_len=96)
    assert_same_generation(run(tiny_model_dir, 1, 24, **changes),
                           run(tiny_model_dir, 1, 24, pipeline_parallel_size=2, **changes))


def test_stages_overlap_plans_and_each_holds_only_its_layers(tiny_model_dir):
    llm = LLM(tiny_model_dir, pipeline_parallel_size=2)
    try:
        runner = llm.engine.runner
        assert runner.stage == PipelineStage(0, (2, 2)) and runner.pipeline_depth == 2
        assert runner.kv_cache.shape[0] == 2  # the KV of its two layers only
        held = {name.split(".")[1] for name, _ in runner.model.named_parameters() if name.startswith("layers.")}
        assert held == {"0", "1"} and not hasattr(runner.model.lm_head, "weight")
        prompts = [[7 + i, 8, 9, 10 + i] for i in range(8)]
        outputs = llm.generate(prompts, greedy(10))
        assert all(len(o.outputs[0].token_ids) == 10 for o in outputs)
        core = llm.engine.core
        assert core.num_overlapped_plans > 0  # a plan went in while the other stage held an earlier one
        assert runner.stage_busy_seconds[0] > 0 and runner.stage_busy_seconds[1] > 0
    finally:
        llm.engine.close()


def test_a_pipelined_engine_traces_each_plans_latency_and_stage_hold(tiny_model_dir, tmp_path):
    """With --step-trace-dir every plan says whether it was alone in the pipeline and how long it held
    the busiest stage (the engine's own time on stage 0, or stage 1's compute); its chunks and rows
    cover every prompt token and every decoded token, as a serial engine's steps do."""
    import random

    from scheduler import step_trace
    llm = LLM(tiny_model_dir, pipeline_parallel_size=2, step_trace_dir=str(tmp_path / "trace"),
              max_num_batched_tokens=64, enable_prefix_caching=False)
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 500) for _ in range(rng.randrange(3, 150))] for _ in range(16)]
    try:
        llm.generate(prompts[:1], greedy(6))  # alone: one request, one plan at a time
        llm.generate(prompts[1:], greedy(6))  # two plans in flight
    finally:
        llm.engine.close()
    steps = step_trace.read([tmp_path / "trace"])
    assert sum(sum(s.prefill) for s in steps) == sum(len(p) for p in prompts)
    assert sum(len(s.decode) for s in steps) == len(prompts) * (6 - 1)
    assert step_trace.is_pipelined(steps)
    assert {s.alone for s in steps} == {True, False}
    held = [s.hold for s in steps if s.hold is not None]
    assert len(held) >= len(steps) - 3 and all(h > 0 for h in held)  # unknown only before the engine idled
    # its own way through the stages; a plan behind others waited for them besides
    assert all(s.work > 0 for s in steps)
    behind = [s for s in steps if not s.alone]
    assert sum(s.seconds for s in behind) > sum(s.work for s in behind)
    assert all(s.seconds > 0 for s in steps)


def test_a_killed_stage_fails_the_offline_engine_with_a_clear_error(tiny_model_dir):
    llm = LLM(tiny_model_dir, pipeline_parallel_size=2)
    try:
        workers = children_running(os.getpid(), TP_WORKER)
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        with pytest.raises(ExecutorDeadError, match=r"rank 1 \(pid \d+\) died"):
            llm.generate([[5, 6, 7]], greedy(4))
    finally:
        llm.engine.close()
    assert not children_running(os.getpid(), TP_WORKER)


def test_sizes_that_cannot_split_the_layers_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match=r"--pipeline-parallel-size 5 cannot split this model: it has 4 layers"):
        check_pipeline_parallel(4, 5)
    with pytest.raises(ValueError, match="cannot split this model"):
        LLM(tiny_model_dir, pipeline_parallel_size=5)
    # vLLM's even split: the remainder on the stages just before the last
    stages = [PipelineStage.of(layer_partition(10, 3), s) for s in range(3)]
    assert [(s.first_layer, s.end_layer) for s in stages] == [(0, 3), (3, 7), (7, 10)]
    assert layer_partition(11, 4) == (3, 3, 3, 2) and layer_partition(12, 2, "7,5") == (7, 5)
    assert ParallelConfig(pipeline_parallel_size=2, pp_layer_partition="even").pp_layer_partition is None
    assert ParallelConfig(pipeline_parallel_size=2, pp_layer_partition=[7, 5]).pp_layer_partition == "7,5"


def test_plans_left_in_flight_are_taken_first_when_the_engine_goes_serial(tiny_model_dir):
    """A generate leaves an empty plan in flight behind the last one; stepping one plan at a time
    afterwards (as bench.pp_pipeline compares) must take it first, or results would be matched to
    the wrong plans."""
    params = greedy(6)
    prompts = [[7 + i, 8, 9] for i in range(6)]
    reference = LLM(tiny_model_dir)
    try:
        expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params)]
    finally:
        reference.engine.close()
    llm = LLM(tiny_model_dir, pipeline_parallel_size=2)
    try:
        core = llm.engine.core
        for depth in (2, 1, 2):
            core.pipeline_depth = core.scheduler.pipeline_depth = depth
            assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected, depth
    finally:
        llm.engine.close()


@pytest.mark.parametrize("tp", [1, 2])
def test_the_native_decode_step_on_stages_equals_their_python_path_bit_for_bit(tiny_model_dir, tp):
    """Each stage binds its own layers for the native decode step (and their cache): tokens and
    logprobs equal --enforce-eager's exactly, and stage 0 took the native path."""
    llm = LLM(tiny_model_dir, pipeline_parallel_size=2, tensor_parallel_size=tp)
    try:
        native = llm.engine.runner.native_decoder
        assert native is not None and native.first_layer == 0 and len(native.layers.layers) == 2  # its 2 of 4
    finally:
        llm.engine.close()
    assert_native_equals_eager(tiny_model_dir, pipeline_parallel_size=2, tensor_parallel_size=tp)
