"""--gpu-memory-utilization (serving/runner/gpu_memory.py): on CUDA, without --kv-cache-memory-bytes, the
KV pool fills the share of the GPU the instance may take, less what is in use and a step's activations.
The arithmetic and the flags here; the sizing on a real GPU in the gpu-marked tests (`make gpu-check`)."""
import argparse

import pytest
import torch

from kvcache.config import DEFAULT_KV_CACHE_BYTES, CacheConfig
from serving.cli import add_serve_args, config_from_args
from serving.models.config import ModelArchConfig
from serving.runner.gpu_memory import ACTIVATION_MARGIN, activation_bytes, kv_budget_from_utilization

GiB = 2**30


def test_the_budget_is_the_share_less_what_is_in_use_and_the_activations():
    # 80 GiB GPU, 17 GiB in use after loading (weights, context), 3 GiB of activations, 0.9 of it allowed
    assert kv_budget_from_utilization(80 * GiB, 63 * GiB, 3 * GiB, 0.9) == int(0.9 * 80 * GiB) - 17 * GiB - 3 * GiB
    with pytest.raises(ValueError, match="--gpu-memory-utilization 0.2 .* leaves no room.*raise "
                                         "--gpu-memory-utilization"):
        kv_budget_from_utilization(80 * GiB, 63 * GiB, 3 * GiB, 0.2)


def test_activations_grow_with_the_step_and_shrink_with_tensor_parallel_ranks(tiny_model_dir):
    arch = ModelArchConfig.from_model_dir(tiny_model_dir)
    one = activation_bytes(arch, 1024, 8, 2)
    assert activation_bytes(arch, 2048, 8, 2) > one > activation_bytes(arch, 1024, 8, 2, tp_size=2)
    # the logits of the sampled rows count whatever the step's tokens: float32, twice, with the margin
    assert activation_bytes(arch, 0, 8, 2) == ACTIVATION_MARGIN * 2 * 8 * arch.vocab_size * 4


def test_flags_defaults_and_refusals():
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    config = config_from_args(parser.parse_args(["--gpu-memory-utilization", "0.5"]))
    assert config.cache.gpu_memory_utilization == 0.5 and config.cache.kv_cache_memory_bytes is None
    assert CacheConfig().kv_bytes == DEFAULT_KV_CACHE_BYTES == 512 * 2**20  # CPU's default, and the simulator's
    assert CacheConfig(kv_cache_memory_bytes=2**20).kv_bytes == 2**20
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="--gpu-memory-utilization must be in"):
            CacheConfig(gpu_memory_utilization=bad)


@pytest.mark.gpu
def test_on_a_gpu_the_pool_fills_its_share(tiny_model_dir):
    """A share 4 GiB above what this process (and anything else on the GPU) already uses: the pool gets
    most of those 4 GiB; a share no larger than what is in use is refused with the flag's name."""
    from scheduler import SamplingParams
    from serving.llm import LLM
    free, total = torch.cuda.mem_get_info()
    share = (total - free + 4 * GiB) / total
    llm = LLM(tiny_model_dir, device="cuda", dtype="float32", gpu_memory_utilization=share, max_num_seqs=8)
    engine = llm.engine
    pool_bytes = engine.kv.pool.num_blocks * engine.runner.layout.bytes_per_block
    assert 2 * GiB < pool_bytes < 4 * GiB
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
    engine.check_integrity()
    del llm, engine
    free, total = torch.cuda.mem_get_info()
    with pytest.raises(ValueError, match="--gpu-memory-utilization"):
        LLM(tiny_model_dir, device="cuda", dtype="float32", gpu_memory_utilization=(total - free) / total)
