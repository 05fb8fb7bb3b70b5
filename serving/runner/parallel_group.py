"""Starting a tensor/pipeline-parallel group from rank 0's process: the engine's way (start the ranks,
load rank 0's shard, leave the cache to the caller) and the tools' way (a whole TensorParallelRunner
with a cache of the config's size). The group itself: serving/runner/tensor_parallel.py."""
from __future__ import annotations

import torch

from kvcache.config import CacheConfig
from serving.models import load_model
from serving.runner.model_runner import model_kv_layout, num_kv_blocks, pool_layout
from serving.runner.tensor_parallel import TensorParallelRunner, TensorParallelWorkers


def start_tensor_parallel(model_dir: str, dtype: torch.dtype, device: torch.device, cache_config: CacheConfig,
                          size: int, seed: int, collective_timeout_s: float, ray_placement_group: str | None = None,
                          ray_namespace: str | None = None, enforce_eager: bool = False, pp: int = 1,
                          pp_partition: tuple[int, ...] = ()):
    """(workers, rank 0's model) for a group of `size` ranks per stage and pp stages (of pp_partition's
    layers; (): the even split): spawns ranks 1.., joins the group, loads rank 0's shard (of stage 0).
    The caller sizes the KV cache from the model's (per-rank) layout (`pool_layout`), calls
    workers.ready and builds a TensorParallelRunner."""
    workers = TensorParallelWorkers(model_dir, dtype, device, size, seed, collective_timeout_s, ray_placement_group,
                                    ray_namespace, enforce_eager, pp, pp_partition)
    try:
        model = load_model(model_dir, dtype, device, workers.group if size > 1 else None, workers.stage)
    except BaseException:
        workers.close()
        raise
    return workers, model


def load_tensor_parallel_runner(model_dir: str, cache_config: CacheConfig, device: torch.device, dtype: torch.dtype,
                                size: int, seed: int = 0, collective_timeout_s: float = 60.0,
                                enforce_eager: bool = False, pp: int = 1,
                                pp_partition: tuple[int, ...] = ()) -> TensorParallelRunner:
    """A whole group for tools and benchmarks (ModelRunner.load's counterpart): ranks started, shards
    loaded, caches of cache_config's size allocated. close() stops the other ranks."""
    workers, model = start_tensor_parallel(model_dir, dtype, device, cache_config, size, seed, collective_timeout_s,
                                           enforce_eager=enforce_eager, pp=pp, pp_partition=pp_partition)
    try:
        layout = model_kv_layout(model, cache_config.block_size)
        num_blocks = num_kv_blocks(pool_layout(layout, workers.stage), cache_config)
        workers.ready(num_blocks, cache_config.block_size)
        return TensorParallelRunner(workers, model, layout.allocate(num_blocks, device), layout, device, seed,
                                    enforce_eager=enforce_eager)
    except BaseException:
        workers.close()
        raise
