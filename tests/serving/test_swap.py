"""Preemption by swapping (--preemption-mode swap): the victim's KV goes to the host tier and comes back,
bit for bit, so greedy and seeded outputs equal those of an engine that never preempts; a failed copy
recomputes; nothing leaks in either tier."""
import threading
import time

import pytest
import torch

import serving.kv_connector.swap as swap_module
from scheduler import SamplingParams
from scheduler.kv_moves import FINISHED, SwapIn, SwapOut
from serving.kv_connector.swap import SwapWorker, spans
from serving.llm import LLM
from tests.serving.test_engine import PROMPTS, hf_greedy, hf_model  # noqa: F401 - the fixture

# 40 blocks of 4 tokens cannot hold 8 requests of ~30 tokens at once: requests get preempted
TIGHT = dict(max_num_batched_tokens=64, block_size=4, num_blocks_override=40, max_model_len=160,
             enable_prefix_caching=False)


def _swapping(tiny_model_dir, **kwargs) -> LLM:
    return LLM(tiny_model_dir, **{**TIGHT, **kwargs}, preemption_mode="swap", swap_space=0.01)


def _greedy(n=16):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def _check_nothing_held(llm: LLM) -> None:
    llm.engine.check_integrity()
    host = llm.engine.scheduler.preemption.host
    assert host.pool.num_free_blocks == host.pool.num_blocks and not host.request_ids
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.kv.pool.num_blocks


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["native", "eager"])
def test_greedy_matches_transformers_with_heavy_swapping(tiny_model_dir, hf_model, enforce_eager):  # noqa: F811
    # 16 requests of up to 40 output tokens in 40 blocks: many swaps, some requests several times
    llm = _swapping(tiny_model_dir, enforce_eager=enforce_eager)
    prompts = PROMPTS + [p[::-1] for p in PROMPTS]
    results = llm.generate(prompts, _greedy(40))
    counters = llm.engine.scheduler.preemption.counters()
    assert counters["preemptions_swap"] >= 10 and counters["swap_in_requests"] == counters["preemptions_swap"]
    assert counters["preemptions_recompute"] == 0  # every victim went to the host tier
    for result in results:
        out = result.outputs[0].token_ids
        assert len(out) == min(40, 160 - len(result.prompt_token_ids))  # the context caps the long ones
        assert out == hf_greedy(hf_model, result.prompt_token_ids, len(out))
    worker = llm.engine.swap_counters()
    assert worker["swap_out_moves"] == counters["preemptions_swap"] and worker["copies_failed"] == 0
    # a request swapped out again copies only what its kept host copy lacks
    assert 0 < worker["swap_out_bytes"] < worker["swap_in_bytes"]
    assert counters["swap_out_blocks"] < counters["swap_in_blocks"]
    _check_nothing_held(llm)


def test_a_resumed_request_reads_the_kv_swap_out_wrote(tiny_model_dir, monkeypatch):
    """Resumed requests compute from the swapped KV, not from a recompute: spoil what a swap-in
    brings back and their outputs change."""
    expected = [r.outputs[0].token_ids for r in _swapping(tiny_model_dir).generate(PROMPTS, _greedy())]
    real_run = swap_module._Copy.run

    def spoiled(self, layer):
        real_run(self, layer)
        if self.kind == "swap_in":
            for _, first, n in self.runs:
                self.dst[layer][:, first:first + n].normal_()
    monkeypatch.setattr(swap_module._Copy, "run", spoiled)
    llm = _swapping(tiny_model_dir)
    got = [r.outputs[0].token_ids for r in llm.generate(PROMPTS, _greedy())]
    assert llm.engine.scheduler.preemption.counters()["swap_in_requests"] > 0
    assert got != expected


@pytest.mark.parametrize("kind", ["swap_out", "swap_in"])
def test_a_failed_swap_recomputes_and_loses_nothing(tiny_model_dir, monkeypatch, kind):
    expected = [r.outputs[0].token_ids for r in LLM(tiny_model_dir, block_size=4, num_blocks_override=512)
                .generate(PROMPTS, _greedy())]
    real_run = swap_module._Copy.run

    def failing(self, layer):
        if self.kind == kind and layer == 2:
            raise RuntimeError("injected copy failure")
        real_run(self, layer)
    monkeypatch.setattr(swap_module._Copy, "run", failing)
    llm = _swapping(tiny_model_dir)
    got = [r.outputs[0].token_ids for r in llm.generate(PROMPTS, _greedy())]
    assert llm.engine.swap_counters()["copies_failed"] > 0
    assert llm.engine.scheduler.preemption.counters()["swap_failed"] > 0
    assert got == expected
    _check_nothing_held(llm)


def test_seeded_sampling_survives_swapping(tiny_model_dir):
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=s, ignore_eos=True) for s in range(8)]
    roomy = LLM(tiny_model_dir, block_size=4, num_blocks_override=512)
    tight = _swapping(tiny_model_dir)
    expected = [r.outputs[0].token_ids for r in roomy.generate(PROMPTS, params)]
    got = [r.outputs[0].token_ids for r in tight.generate(PROMPTS, params)]
    assert tight.engine.scheduler.preemption.counters()["preemptions_swap"] > 0
    assert got == expected


def test_a_full_host_tier_falls_back_to_recompute(tiny_model_dir):
    # 64 KiB of host memory holds 8 of the tiny model's 8 KiB blocks: most victims do not fit
    llm = LLM(tiny_model_dir, **TIGHT, preemption_mode="swap", swap_space=2**-14)
    results = llm.generate(PROMPTS, _greedy())
    counters = llm.engine.scheduler.preemption.counters()
    assert counters["preemptions_recompute"] > 0
    expected = LLM(tiny_model_dir, block_size=4, num_blocks_override=512).generate(PROMPTS, _greedy())
    assert [r.outputs[0].token_ids for r in results] == [r.outputs[0].token_ids for r in expected]
    _check_nothing_held(llm)


def test_aborts_of_swapped_and_running_requests_free_both_tiers(tiny_model_dir):
    llm = _swapping(tiny_model_dir)
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", llm.tokenizer.encode(prompt), _greedy(40))
    swapped = []
    for _ in range(500):
        engine.step()
        swapped = [r.request_id for r in engine.scheduler.waiting if r.status.value == "swapped"]
        if swapped:
            break
    assert swapped, "no request was swapped out"
    assert engine.get_stats().num_swapped == len(swapped)
    engine.abort_requests(swapped + [engine.scheduler.running[0].request_id])
    while engine.has_unfinished():
        engine.step()
    _check_nothing_held(llm)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_swap_worker_copies_blocks_bit_for_bit_by_runs(device):
    """On CUDA over PCIe, into pinned memory, on the worker's stream: it waits for what the compute stream
    wrote just before."""
    torch.manual_seed(0)
    kv = torch.randn(3, 2, 16, 4, 2, 8, device=device)
    host = torch.zeros(3, 2, 8, 4, 2, 8, pin_memory=device == "cuda")
    worker = SwapWorker(kv, host)
    try:
        device_blocks, host_blocks = [3, 4, 5, 9], [0, 1, 2, 7]
        kv[:, :, device_blocks] += 1.0
        original = kv[:, :, device_blocks].clone()
        worker.start([SwapOut("a", device_blocks, host_blocks)])
        worker.wait_layers(0, 3)
        assert torch.equal(host[:, :, host_blocks], original.cpu())
        kv[:, :, device_blocks] = 0.0
        back = [10, 11, 12, 1]
        worker.start([SwapIn("a", host_blocks, back)])
        worker.wait_layers(0, 3)
        assert torch.equal(kv[:, :, back], original)
        assert [(r.kind, r.state) for r in worker.poll()] == [("swap_out", FINISHED), ("swap_in", FINISHED)]
        counters = worker.counters()
        assert counters["swap_out_copies"] == 2 * 3 and counters["swap_in_copies"] == 2 * 3  # two runs per layer
        assert counters["swap_out_bytes"] == 4 * 3 * 2 * 4 * 2 * 8 * 4
    finally:
        worker.close()


def test_a_waiter_wakes_at_its_layer_not_at_the_end_of_the_job(monkeypatch):
    """The thread wakes a waiter once the layer it waits for is copied (the runner's per-layer wait),
    across jobs queued behind each other, and not before."""
    gates = {layer: threading.Event() for layer in range(4)}
    copied = []
    real_run = swap_module._Copy.run

    def gated_run(self, layer):
        gates[layer].wait(30)
        real_run(self, layer)
        copied.append(layer)
    monkeypatch.setattr(swap_module._Copy, "run", gated_run)
    kv, host = torch.randn(4, 2, 8, 4, 2, 8), torch.zeros(4, 2, 8, 4, 2, 8)
    worker = SwapWorker(kv, host, timeout_s=30)
    try:
        worker.start([SwapOut("a", [0, 1], [0, 1])])
        for layer in (0, 1):
            gates[layer].set()
        worker.wait_layers(0, 2)  # layers 0 and 1: its last two still held back
        assert copied == [0, 1]
        worker.start([SwapOut("b", [2], [2])])  # queued behind the first
        for layer in (2, 3):
            gates[layer].set()
        worker.wait_layers(1, 2)  # the second job's layer 1, so every layer of the first
        assert copied[:6] == [0, 1, 2, 3, 0, 1]
        worker.wait_layers(0, 4)
        assert copied == [0, 1, 2, 3, 0, 1, 2, 3]
        assert torch.equal(host[:, :, :3], kv[:, :, :3])
        assert [r.state for r in worker.poll()] == [FINISHED, FINISHED]
    finally:
        worker.close()


def test_a_wait_for_every_layer_returns_with_the_jobs_results(monkeypatch):
    """The runner's wait for all layers at the end of a step returns once the job's results are there,
    not as soon as its last layer is copied: the step takes its swaps' results with it."""
    kv, host = torch.randn(2, 2, 4, 4, 2, 8), torch.zeros(2, 2, 4, 4, 2, 8)
    worker = SwapWorker(kv, host, timeout_s=30)
    real_observe = worker.seconds.observe

    def slow_observe(seconds):  # between the last layer's copy and the results' publication
        time.sleep(0.3)
        real_observe(seconds)
    monkeypatch.setattr(worker.seconds, "observe", slow_observe)
    try:
        worker.start([SwapOut("a", [0, 1], [2, 3])])
        worker.wait_layers(0, 2)
        assert [(r.request_id, r.state) for r in worker.poll()] == [("a", FINISHED)]
    finally:
        worker.close()


def test_spans_follow_both_sides():
    assert spans([(3, 0), (4, 1), (5, 2), (9, 7)]) == [(3, 0, 3), (9, 7, 1)]
    assert spans([(3, 0), (4, 2)]) == [(3, 0, 1), (4, 2, 1)]  # the host side breaks the run
    assert spans([]) == []


def test_tensor_parallel_ranks_swap_their_own_heads(tiny_model_dir):
    """Every rank of a TP=2 group swaps its heads of the blocks rank 0's scheduler names, into a host
    tier of its own: outputs equal a single rank that never preempts."""
    expected = [r.outputs[0].token_ids for r in LLM(tiny_model_dir, block_size=4, num_blocks_override=512)
                .generate(PROMPTS, _greedy(24))]
    llm = _swapping(tiny_model_dir, tensor_parallel_size=2)
    try:
        got = [r.outputs[0].token_ids for r in llm.generate(PROMPTS, _greedy(24))]
        assert llm.engine.scheduler.preemption.counters()["preemptions_swap"] > 0
        assert got == expected
        _check_nothing_held(llm)
    finally:
        llm.engine.close()


@pytest.mark.parametrize("tp, pp", [(1, 2), (1, 4)])
def test_pipeline_stages_swap_their_own_layers_with_plans_in_flight(tiny_model_dir, tp, pp):
    """Every stage swaps its layers of the blocks stage 0's scheduler names, while up to pp plans are
    in flight: a plan's moves are reported once every stage ran it, so requests may be preempted,
    resumed and preempted again before a report comes. Outputs equal a single rank that never
    preempts; both tiers end empty."""
    expected = [r.outputs[0].token_ids for r in LLM(tiny_model_dir, block_size=4, num_blocks_override=512)
                .generate(PROMPTS, _greedy(24))]
    llm = _swapping(tiny_model_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    try:
        got = [r.outputs[0].token_ids for r in llm.generate(PROMPTS, _greedy(24))]
        counters = llm.engine.scheduler.preemption.counters()
        assert counters["preemptions_swap"] > 0 and counters["preemptions_recompute"] == 0
        assert counters["swap_in_requests"] == counters["preemptions_swap"]
        assert llm.engine.core.num_overlapped_plans > 0
        assert got == expected
        _check_nothing_held(llm)
    finally:
        llm.engine.close()


def test_a_tiny_or_unknown_swap_setting_is_named(tiny_model_dir):
    with pytest.raises(ValueError, match="raise --swap-space"):
        LLM(tiny_model_dir, preemption_mode="swap", swap_space=1e-9)
    with pytest.raises(ValueError, match="--preemption-mode must be one of recompute, swap"):
        LLM(tiny_model_dir, preemption_mode="teleport")


def test_a_second_turn_brings_its_history_back_from_the_host_tier(tiny_model_dir):
    """The first turn's KV is offloaded to the host tier when it finishes; other traffic evicts it from
    the device's prefix cache; the second turn (history + new text) swaps the history back in, computes
    only what is new, and generates what a fresh engine does."""
    llm = LLM(tiny_model_dir, block_size=4, num_blocks_override=64, max_model_len=200, preemption_mode="swap",
              swap_space=0.01)
    preemption = llm.engine.scheduler.preemption
    history = llm.tokenizer.encode("Once upon a time, in a land far away, there lived a dragon who loved numbers")
    first = llm.generate([history], _greedy(12))[0]
    assert preemption.counters()["host_offloaded_blocks"] >= (len(history) + 11) // 4
    # unrelated prompts take every device block: the history's cached device blocks are evicted
    llm.generate([[7 + i] * 100 for i in range(3)], _greedy(8))
    turn = history + first.outputs[0].token_ids + llm.tokenizer.encode(" and then what happened?")
    assert not llm.engine.kv.lookup_prefix(turn), "the history should have left the device cache"
    second = llm.generate([turn], _greedy(12))[0]
    history_blocks = (len(history) + 11) // 4  # full blocks of the first turn's computed tokens
    assert second.num_cached_tokens == history_blocks * 4
    assert preemption.counters()["host_prefix_hit_tokens"] == history_blocks * 4
    fresh = LLM(tiny_model_dir, block_size=4, num_blocks_override=64, max_model_len=200)
    assert second.outputs[0].token_ids == fresh.generate([turn], _greedy(12))[0].outputs[0].token_ids
    _check_nothing_held(llm)


def test_a_worker_dropped_without_close_is_collected_and_its_thread_ends():
    import gc
    import time
    import weakref
    worker = SwapWorker(torch.zeros(2, 2, 4, 4, 1, 8), torch.zeros(2, 2, 4, 4, 1, 8))
    ref, thread = weakref.ref(worker), worker._thread
    del worker
    deadline = time.monotonic() + 10
    while (ref() is not None or thread.is_alive()) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.1)
    assert ref() is None and not thread.is_alive()  # the host tier goes with it
