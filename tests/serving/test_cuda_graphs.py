"""CUDA graphs of decode steps (serving/runner/cuda_graphs.py). On CPU the graphs' buffers, padding and
dispatch run with the model executed eagerly on those buffers (capture=False) and must give what the
eager runner gives, bit for bit, KV cache included; the captured graphs themselves run under
`make gpu-check` (the gpu-marked tests below)."""
import argparse

import pytest
import torch

from kvcache.config import CacheConfig
from scheduler import NewRequestData, SamplingParams
from serving.cli import add_serve_args, config_from_args
from serving.config import Config
from serving.runner.cuda_graphs import DecodeGraphs, capture_sizes
from serving.runner.model_runner import ModelRunner
from tests.serving.test_native_decoder import BLOCK_SIZE, PARAMS, _run, _scenario

MAX_MODEL_LEN = 128


def _runner(model_dir: str, enforce_eager: bool) -> ModelRunner:
    return ModelRunner.load(model_dir, CacheConfig(block_size=BLOCK_SIZE, num_blocks_override=160),
                            torch.device("cpu"), torch.float32, enforce_eager=enforce_eager)


def _graph_runner(model_dir: str, sizes=(1, 2, 4, 8)) -> ModelRunner:
    runner = _runner(model_dir, enforce_eager=False)
    graphs = runner.capture_decode_graphs(sizes, MAX_MODEL_LEN, capture=False)
    assert graphs is runner.decode_graphs and sorted(graphs.graphs) == sorted(sizes)
    return runner


@pytest.mark.parametrize("spec, max_num_seqs, expected", [
    (None, 128, (1, 2, 4, *range(8, 129, 8))),
    (None, 20, (1, 2, 4, 8, 16, 20)),                # the largest batch the scheduler makes is captured
    (None, 1024, (1, 2, 4, *range(8, 513, 8))),      # at most 512 by default, as vLLM
    ("16", 128, (1, 2, 4, 8, 16)),                   # one value: the pattern up to it
    ("1,3,5", 128, (1, 3, 5)),                       # several: exactly those
    ([4, 2, 64], 32, (2, 4)),                        # a YAML list; sizes past max_num_seqs dropped
    ("0", 128, ()),                                  # none
])
def test_capture_sizes_follow_vllms_flag(spec, max_num_seqs, expected):
    assert capture_sizes(spec, max_num_seqs) == expected


@pytest.mark.parametrize("bad", ["a,b", "-1", "0,8"])
def test_bad_capture_sizes_say_what_to_change(bad):
    with pytest.raises(ValueError, match="--cuda-graph-sizes"):
        Config.from_dict({"cuda_graph_sizes": bad})


def test_the_flag_and_the_yaml_key_reach_the_config():
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    assert config_from_args(parser.parse_args(["--cuda-graph-sizes", "1,2,4"])).model.cuda_graph_sizes == "1,2,4"
    assert Config.from_dict({"model": {"cuda-graph-sizes": [8, 1]}}).model.cuda_graph_sizes == "8,1"
    assert Config().model.cuda_graph_sizes is None


def test_graph_path_is_bit_identical_to_the_eager_runner(tiny_model_dir):
    """Batches of 1, 2, 3, 5 and 8 rows (3 and 5 padded to 4 and 8): the same tokens and logprobs, and the
    same KV cache bit for bit (so padded rows wrote nothing)."""
    eager, graphed = _runner(tiny_model_dir, enforce_eager=True), _graph_runner(tiny_model_dir)
    graphs = graphed.decode_graphs
    for num_rows in (1, 2, 3, 5, 8):
        plans = _scenario(num_rows, seed=num_rows)
        assert _run(graphed, plans) == _run(eager, plans), f"{num_rows} rows"
        assert torch.equal(graphed.kv_cache, eager.kv_cache), f"{num_rows} rows: KV caches differ"
    # 4 decode steps a scenario, one of them split into layer segments (a KV send's): that one runs eagerly
    assert graphs.replays == 3 * 5
    assert graphs.padded_rows == 3 * (1 + 3)  # 3 -> 4 and 5 -> 8, three steps each


def test_prefill_mixed_segmented_and_wide_steps_run_eagerly(tiny_model_dir):
    runner = _graph_runner(tiny_model_dir, sizes=(1, 2, 4))
    graphs = runner.decode_graphs
    _run(runner, _scenario(5, seed=0))  # 5 rows: past the largest size
    assert graphs.replays == 0
    plans = _scenario(2, seed=1)
    # a prompt scheduled beside the decodes of the third decode step makes that step mixed
    plans[3].new_requests.append(NewRequestData("p", [5, 6, 7], 3, PARAMS, [150], 0))
    plans[3].num_scheduled_tokens["p"] = 3
    _run(runner, plans)
    assert graphs.replays == 2  # plain, (split: eager), (mixed: eager), plain


def test_no_graphs_where_they_do_not_apply(tiny_model_dir):
    assert _runner(tiny_model_dir, enforce_eager=True).capture_decode_graphs((1, 2), MAX_MODEL_LEN, False) is None
    assert _runner(tiny_model_dir, enforce_eager=False).capture_decode_graphs((), MAX_MODEL_LEN, False) is None
    with pytest.raises(ValueError, match="CUDA device"):
        DecodeGraphs(None, None, (1,), MAX_MODEL_LEN, BLOCK_SIZE, torch.device("cpu"), capture=True)


@pytest.mark.gpu
def test_captured_graphs_decode_like_eager_on_cuda(tiny_model_dir):
    """The real graphs: captured at start by the engine, replayed for decode steps, the same greedy tokens
    as --enforce-eager in float32 (the capture uses max_model_len for attention's splits, so bfloat16
    may round differently), every block back in the pool."""
    from serving.llm import LLM
    from tests.serving.test_engine import PROMPTS, SYSTEM
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outputs = {}
    for eager in (True, False):
        llm = LLM(tiny_model_dir, device="cuda", dtype="float32", max_num_seqs=8, enforce_eager=eager,
                  block_size=16, num_blocks_override=256)
        graphs = llm.engine.runner.decode_graphs
        assert (graphs is None) == eager
        outputs[eager] = [r.outputs[0].token_ids for r in llm.generate([SYSTEM + p for p in PROMPTS], params)]
        if not eager:
            assert graphs.sizes == (1, 2, 4, 8) and all(c.graph is not None for c in graphs.graphs.values())
            assert graphs.replays > 0
        llm.engine.check_integrity()
    assert outputs[False] == outputs[True]
