"""The CUDA paths of swapping and of disaggregated serving, which the CPU suite cannot run: greedy
output with the swap worker's stream and pinned host tier (its copies alone: tests/serving/test_swap.py),
prefill/decode instance processes on one GPU, the prefill instance writing into the decode instance's
GPU pool (CUDA IPC), and instances of several ranks whose rank 0 maps the others' GPU caches (CUDA IPC;
two GPUs, or three on Ray). Skipped without a CUDA device; `make gpu-check` runs them. Each compares
against what the CPU tests compare against (transformers, a colocated engine) on the same device."""
import pytest
import torch

from scheduler.sampling_params import SamplingParams
from serving.llm import LLM
from tests.serving.test_engine import PROMPTS
from tests.serving.test_swap import TIGHT, _check_nothing_held

pytestmark = pytest.mark.gpu


def test_greedy_on_cuda_with_heavy_swapping_matches_transformers(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    model_dir = tiny_model_dir
    llm = LLM(model_dir, **TIGHT, device="cuda", dtype="float32", preemption_mode="swap", swap_space=0.01)
    swap = llm.engine.connector.swap
    assert swap.kv_cache.is_cuda and swap.host_cache.is_pinned() and swap._stream is not None
    results = llm.generate(PROMPTS + [p[::-1] for p in PROMPTS],
                           SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    assert llm.engine.scheduler.preemption.counters()["preemptions_swap"] >= 10
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    for result in results:
        out = result.outputs[0].token_ids
        ids = torch.tensor([result.prompt_token_ids], device="cuda")
        expected = hf.generate(ids, max_new_tokens=len(out), min_new_tokens=len(out), do_sample=False)
        assert out == expected[0, ids.shape[1]:].tolist()
    _check_nothing_held(llm)


def test_disaggregated_on_one_gpu_equals_colocated(tiny_model_dir):
    from tests.serving.test_disagg import deployment, wait_for_stats
    from tests.serving.test_disagg_support import (LoopThread, assert_no_leaks, collect_all, comparable,
                                                   make_cases, reference_outputs, tiny_config, wait_until_drained)
    cases = make_cases("gpu", 3, [1, 15, 17, 100, 250], [1, 8, 24])
    on_gpu = dict(device="cuda", dtype="float32", max_num_batched_tokens=64)
    expected = reference_outputs(tiny_config(tiny_model_dir, **on_gpu), cases)
    loop = LoopThread()
    try:
        with deployment(loop, tiny_config(tiny_model_dir, mode="disaggregated", **on_gpu)) as client:
            got = loop.run(collect_all(client, cases))
            for case in cases:
                assert not isinstance(got[case.request_id], BaseException), got[case.request_id]
                assert comparable(got[case.request_id]) == comparable(expected[case.request_id]), case.request_id
                if case.params.max_tokens > 1:
                    assert got[case.request_id][-1].kv_transfer == "transferred", case.request_id
            assert_no_leaks(loop.run(wait_until_drained(client)))
            num_decoded = sum(1 for c in cases if c.params.max_tokens > 1)
            stats = loop.run(wait_for_stats(client, lambda s: s.extra["kv_transfer"]["num_transfers_received"]
                                            >= num_decoded))
            # one host: the prefill instance wrote every prompt's KV into the decode instance's GPU pool
            # itself (CUDA IPC), none by payloads or recompute
            transfer = stats.extra["kv_transfer"]
            assert transfer["num_one_sided_received"] == transfer["num_transfers_received"] >= num_decoded
            assert transfer["num_recompute_fallbacks"] == 0
    finally:
        loop.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="instances of two ranks need two GPUs (NCCL takes one "
                                                         "rank per GPU)")
@pytest.mark.parametrize("prefill_tp, decode_tp, prefill_pp", [(2, 1, 1), (1, 2, 1), (1, 2, 2)],
                         ids=["prefill-tp2-decode-tp1", "prefill-tp1-decode-tp2", "prefill-pp2-decode-tp2"])
def test_disaggregated_instances_of_several_ranks_on_gpus_equal_colocated(tiny_model_dir, prefill_tp, decode_tp,
                                                                           prefill_pp):
    """Rank 0 of each instance maps its ranks' GPU caches by CUDA IPC and moves their heads and layers:
    output equals a colocated TP = 1 engine on the same GPU, each decode rank gets exactly its heads."""
    from serving.engine.engine import build_engine
    from tests.serving.test_disagg_engine import _reference
    from tests.serving.test_disagg_support import tiny_config, token_ids
    from tests.serving.test_disagg_tp import _check_transfers

    def engine(role, tp, pp=1):
        return build_engine(tiny_config(tiny_model_dir, device="cuda", dtype="float32", tensor_parallel_size=tp,
                                        pipeline_parallel_size=pp, kv_transfer_stall_timeout_s=5.0), role)
    colocated = engine("colocated", 1)
    try:
        def reference(prompt, params):
            return token_ids(_reference(colocated, prompt, params))
        prefill, decode = engine("prefill", prefill_tp, prefill_pp), engine("decode", decode_tp)
        assert all(cache.is_cuda for cache in decode.connector.receives._server.receiver.kv_caches)
        _check_transfers(prefill, decode, decode_tp, reference)
    finally:
        colocated.close()


@pytest.mark.skipif(torch.cuda.device_count() < 3, reason="a prefill instance of one rank and a decode instance of "
                                                         "two on Ray take three GPUs (one per rank)")
def test_a_decode_instance_of_two_ranks_on_ray_gpus_equals_colocated(tiny_model_dir):
    """The Ray launcher, one GPU per rank: decode-0's actor sees the node's GPUs (its own first) and maps
    its rank 1's cache on rank 1's GPU; output equals a colocated engine's on one GPU."""
    ray = pytest.importorskip("ray")
    from serving.router.engine_client import build_disaggregated_client
    from tests.serving.test_disagg_support import (LoopThread, assert_no_leaks, collect_all, make_cases,
                                                   reference_outputs, tiny_config, token_ids, wait_until_drained)
    gpu = {"device": "cuda", "dtype": "float32"}
    config = tiny_config(tiny_model_dir, mode="disaggregated", launcher="ray", num_gpus_per_instance=1,
                         decode_overrides={"tensor_parallel_size": 2}, **gpu)
    loop = LoopThread()
    client = build_disaggregated_client(config)
    try:
        cases = make_cases("ray-cuda-tp", 18, [12, 40], [10])
        expected = reference_outputs(tiny_config(tiny_model_dir, **gpu), cases)
        got = loop.run(collect_all(client, cases))
        for case in cases:
            assert token_ids(got[case.request_id]) == token_ids(expected[case.request_id])
        assert len(client._launcher.visible_gpus("decode-0").split(",")) >= 3
        assert client.get_stats().extra["router"]["num_kv_transferred_total"] == len(cases)
        assert_no_leaks(loop.run(wait_until_drained(client)))
    finally:
        loop.run(client.shutdown())
        loop.close()
    assert not ray.is_initialized()
