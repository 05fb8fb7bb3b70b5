"""Tensor parallelism (serving/models/tensor_parallel.py, serving/runner/tensor_parallel.py): real rank
processes joined by gloo on CPU. Greedy output with TP > 1 equals TP = 1 on the same weights; a rank
that dies takes its engine down cleanly, and the engine process comes back whole."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from scheduler import SamplingParams
from scheduler.errors import ExecutorDeadError
from serving.engine.protocol import EngineDeadError
from serving.llm import LLM
from serving.metrics import ServingMetrics
from serving.models.config import ModelArchConfig
from serving.models.tensor_parallel import check_tensor_parallel, rank_config
from tests.serving.test_disagg_support import children_running
from tests.serving.test_engine_process import (DEADLINE_S, alive, engine_children, long_streams_under_way,
                                              make_llm, tokens_of)
from tests.serving.test_models import CASES, save_hf_case

TP_WORKER = b"serving.runner.rank_hosts"
PROMPTS = [[5, 6, 7, 8], list(range(10, 60)), [30] * 17, list(range(3, 40, 2))]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)


def run(model_dir: str, tp: int, max_tokens: int = 16, **changes):
    llm = LLM(model_dir, tensor_parallel_size=tp, **changes)
    try:
        outputs = llm.generate(PROMPTS, greedy(max_tokens))
        llm.engine.check_integrity()
        free, total = llm.engine.kv.pool.num_free_blocks, llm.engine.kv.pool.num_blocks
        assert free == total  # every block back in the pool
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outputs]
    finally:
        llm.engine.close()


def assert_same_generation(expected, got) -> None:
    for (tokens, logprobs), (tp_tokens, tp_logprobs) in zip(expected, got):
        assert tp_tokens == tokens
        assert len(tp_logprobs) == len(logprobs) == len(tokens)
        for step, tp_step in zip(logprobs, tp_logprobs):  # the same tokens ranked, logprobs to float error
            assert tp_step.token_id == step.token_id
            assert [t for t, _ in tp_step.top] == [t for t, _ in step.top]
            assert abs(tp_step.logprob - step.logprob) < 1e-3
            assert all(abs(a - b) < 1e-3 for (_, a), (_, b) in zip(tp_step.top, step.top))


@pytest.fixture(scope="module")
def case_dirs(tmp_path_factory):
    dirs = {}
    for case in CASES:
        dirs[case] = str(tmp_path_factory.mktemp(case))
        save_hf_case(case, dirs[case])
    return dirs


# (case, tp): every architecture at 2; 4 ranks over 2 KV heads (each replicated on two ranks); one
# KV head for all ranks with a vocabulary split unevenly (131 = 66 + 65)
TP_CASES = [(case, 2) for case in sorted(CASES)] + [("mistral", 4), ("llama-mqa-odd-vocab", 4)]


@pytest.mark.parametrize("case, tp", TP_CASES)
def test_greedy_output_with_tensor_parallelism_equals_one_rank(case_dirs, tiny_model_dir, case, tp):
    model_dir = case_dirs[case]  # no tokenizer of its own: the prompts are token ids below every vocabulary
    assert_same_generation(run(model_dir, 1, tokenizer=tiny_model_dir), run(model_dir, tp, tokenizer=tiny_model_dir))


def test_the_built_in_tiny_model_through_chunked_prefill_and_preemption(tiny_model_dir):
    """Small steps and a small pool: chunked prefills, mixed steps and preemption, on two ranks."""
    changes = dict(max_num_batched_tokens=16, num_gpu_blocks_override=24, block_size=4, max_model_len=96)
    assert_same_generation(run(tiny_model_dir, 1, 24, **changes), run(tiny_model_dir, 2, 24, **changes))


@pytest.mark.slow
def test_the_small_model_on_two_ranks_equals_one(tmp_path_factory):
    from serving.models.make_model import make_model
    model_dir = make_model("small", str(tmp_path_factory.mktemp("small")))
    assert_same_generation(run(model_dir, 1, 8), run(model_dir, 2, 8))


def test_the_native_decode_step_on_two_ranks_equals_their_python_path_bit_for_bit(tiny_model_dir):
    """Decode steps of 1-8 rows run each rank's layers in one native call, which sums o and down over
    the group itself (the same shared-memory collective, the same order): tokens and logprobs equal
    --enforce-eager's exactly, and rank 0 took the native path."""
    assert_native_equals_eager(tiny_model_dir, tensor_parallel_size=2)


def assert_native_equals_eager(model_dir: str, **plan) -> None:
    """Generate with the native decode step (counting rank 0's native calls) and with --enforce-eager:
    tokens and logprobs equal exactly, and rank 0 took the native path every decode step."""
    llm = LLM(model_dir, **plan)
    try:
        native = llm.engine.runner.native_decoder
        calls = [0]
        layers = native.layers

        def counted(*args):
            calls[0] += 1
            return layers(*args)
        native.layers = counted
        got = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(PROMPTS, greedy(12))]
    finally:
        llm.engine.close()
    assert calls[0] >= 11  # every decode step after the prefills
    eager = run(model_dir, plan.pop("tensor_parallel_size", 1), 12, enforce_eager=True, **plan)
    for (tokens, logprobs), (e_tokens, e_logprobs) in zip(got, eager):
        assert tokens == e_tokens and logprobs == e_logprobs


def test_sizes_that_cannot_split_the_model_are_refused_saying_which_can(tiny_model_dir):
    config = ModelArchConfig.from_model_dir(tiny_model_dir)  # 4 heads, 2 KV heads, intermediate 256
    with pytest.raises(ValueError, match=r"--tensor-parallel-size 3 cannot split this model: num_attention_heads "
                                         r"\(4\) is not a multiple of it.*Sizes that can: 1, 2, 4"):
        check_tensor_parallel(config, 3)
    with pytest.raises(ValueError, match="cannot split this model"):
        LLM(tiny_model_dir, tensor_parallel_size=3)
    local = rank_config(config, 4)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size, local.vocab_size) == (
        1, 1, 64, config.vocab_size)


def test_a_rank_cache_rank_0_cannot_open_is_refused_saying_what_to_change():
    """On CUDA rank 0 opens each worker rank's cache from the CUDA IPC handle the rank sent at ready;
    where it cannot (no GPU in this process, or a GPU it cannot see) it says which rank and what to do."""
    import torch
    from kvcache.layout import KVCacheLayout
    from kvcache.transfer._proto import kv_transfer_pb2 as pb
    from serving.runner.rank_memory import open_rank_cache, rank_cache
    layout = KVCacheLayout.for_model(4, 1, 32, 16, "float32")
    handle = pb.CudaIpcHandle(device_uuid="GPU-not-here", handle=b"\x01" * 64,
                              storage_size_bytes=8 * layout.bytes_per_block).SerializeToString()
    with pytest.raises(RuntimeError, match=r"maps every rank's KV cache and cannot open rank 1's \(.*\): run the "
                                           r"instance's ranks as processes of one host .*\(the local launcher\)"):
        open_rank_cache(1, handle, layout, 8)
    with pytest.raises(RuntimeError, match="rank 2 did not export its KV cache"):
        open_rank_cache(2, None, layout, 8)
    cache, exported = rank_cache(None, layout, 8, torch.device("cpu"))  # a colocated rank: its own, nothing sent
    assert exported is None and cache.shape == layout.shape(8)


def _tp_workers_of(pid: int) -> list[int]:
    return children_running(pid, TP_WORKER)


def test_a_killed_rank_fails_the_offline_engine_with_a_clear_error(tiny_model_dir):
    llm = LLM(tiny_model_dir, tensor_parallel_size=2)
    try:
        workers = _tp_workers_of(os.getpid())
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(ExecutorDeadError, match=r"tensor-parallel rank 1 \(pid \d+\) died"):
            llm.generate([[5, 6, 7]], greedy(4))
        assert time.monotonic() - started < 60  # seen at once, not after a collective's timeout
    finally:
        llm.engine.close()
    assert not _tp_workers_of(os.getpid())


def test_a_rank_killed_mid_request_restarts_the_engine_process_whole(tiny_model_dir):
    llm = make_llm(tiny_model_dir, tensor_parallel_size=2)
    prompt = [5, 6, 7]

    async def main():
        reference = await tokens_of(llm, "reference", prompt, greedy(8))
        tasks = await long_streams_under_way(llm, prompt, 2)
        engine_pid = llm.core.pid
        workers = _tp_workers_of(engine_pid)
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        errors = await asyncio.gather(*tasks, return_exceptions=True)
        while not llm.is_healthy():
            await asyncio.sleep(0.1)
        after = await tokens_of(llm, "after", prompt, greedy(8))
        new_workers = _tp_workers_of(llm.core.pid)
        metrics = ServingMetrics("m", 128)
        metrics.observe_engine_stats(llm.get_stats())
        assert 'pdserve:engine_restarts_total{model_name="m"} 1.0' in metrics.render().decode()  # a counter says so
        await llm.call(lambda engine: engine.check_integrity())
        await llm.shutdown()
        return reference, errors, engine_pid, workers[0], after, new_workers

    reference, errors, engine_pid, worker, after, new_workers = asyncio.run(asyncio.wait_for(main(), DEADLINE_S))
    for error in errors:
        assert isinstance(error, EngineDeadError), error
        assert "ExecutorDeadError" in str(error) and "being restarted" in str(error), str(error)
    assert after == reference
    assert llm.core.num_restarts == 1 and llm.core.pid != engine_pid
    assert len(new_workers) == 1 and new_workers[0] != worker
    deadline = time.monotonic() + 30
    while (alive(engine_pid) or alive(worker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(engine_pid) and not alive(worker)
    assert not engine_children(os.getpid())  # shutdown left nothing behind


def test_worker_ranks_exit_when_the_process_of_rank_0_is_killed(tiny_model_dir, tmp_path):
    import subprocess
    import sys
    script = tmp_path / "rank0.py"
    script.write_text(f"from serving.llm import LLM\nllm = LLM({tiny_model_dir!r}, tensor_parallel_size=2)\n"
                      "print('ready', flush=True)\nimport time\ntime.sleep(600)\n")
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                               cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        assert process.stdout.readline().strip() == "ready"
        workers = _tp_workers_of(process.pid)
        assert len(workers) == 1
        process.kill()
        process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while alive(workers[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(workers[0])
    finally:
        if process.poll() is None:
            process.kill()


def test_rank_0_holds_its_share_of_the_weights_and_the_cache(tiny_model_dir):
    """4 heads, 2 KV heads, head_dim 32, intermediate 256, vocabulary 2048 over two ranks."""
    llm = LLM(tiny_model_dir, tensor_parallel_size=2)
    try:
        model, runner = llm.engine.runner.model, llm.engine.runner
        config = model.config
        assert (config.num_heads, config.num_kv_heads, config.intermediate_size, config.vocab_size) == (2, 1, 128, 2048)
        assert runner.kv_cache.shape[-2:] == (1, 32)  # this rank's KV head only
        assert (runner.layout.tp_size, runner.layout.tp_rank, runner.layout.kv_head_range()) == (2, 0, (0, 1))
        layer = model.layers[0]
        assert layer.self_attn.qkv_proj.weight.shape == ((2 + 1 + 1) * 32, 128)
        assert layer.self_attn.o_proj.linear.weight.shape == (128, 2 * 32)
        assert layer.mlp.gate_up_proj.weight.shape == (2 * 128, 128)
        assert layer.mlp.down_proj.linear.weight.shape == (128, 128)
        assert model.embed_tokens.weight.shape == (1024, 128) and model.lm_head.linear.weight.shape == (1024, 128)
        assert runner.native_decoder is not None and runner.native_decoder.layers.collective.size == 2
        # built in its shapes and loaded part by part: rank 0 holds half the weights (norms are whole)
        from serving.models.cpu_linear import PackedLinear
        whole = LLM(tiny_model_dir).engine.runner.model

        def weight_numel(m):
            linears = [x for x in m.modules() if isinstance(x, PackedLinear)]
            return sum(x.in_features * x.out_features for x in linears) + m.embed_tokens.weight.numel()
        assert weight_numel(model) == weight_numel(whole) // 2
    finally:
        llm.engine.close()


@pytest.mark.parametrize("plan", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}], ids=["tp2", "pp2"])
def test_a_hung_rank_times_out_restarts_the_engine_and_is_killed(tiny_model_dir, plan):
    """SIGSTOP rank 1 mid-request: rank 0's next collective gives up after collective_timeout_s (a
    TP peer), or its wait for the last pipeline stage's answer after 4 x collective_timeout_s; the
    streams fail, the stopped rank is killed (not left behind) and the engine comes back whole."""
    llm = make_llm(tiny_model_dir, collective_timeout_s=3, **plan)
    prompt = [5, 6, 7]

    async def main():
        reference = await tokens_of(llm, "reference", prompt, greedy(8))
        tasks = await long_streams_under_way(llm, prompt, 2)
        (worker,) = _tp_workers_of(llm.core.pid)
        os.kill(worker, signal.SIGSTOP)
        errors = await asyncio.gather(*tasks, return_exceptions=True)
        while not llm.is_healthy():
            await asyncio.sleep(0.1)
        after = await tokens_of(llm, "after", prompt, greedy(8))
        await llm.shutdown()
        return reference, errors, worker, after

    reference, errors, worker, after = asyncio.run(asyncio.wait_for(main(), DEADLINE_S))
    for error in errors:
        assert isinstance(error, EngineDeadError) and "ExecutorDeadError" in str(error), error
    assert after == reference and llm.core.num_restarts == 1
    deadline = time.monotonic() + 30
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(worker)  # killed, though stopped
