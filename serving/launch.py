"""Builds the EngineClient that the HTTP server talks to, by placement mode."""
from __future__ import annotations

import os

from serving.config import Config
from serving.engine.protocol import EngineClient


def build_engine_client(config: Config) -> EngineClient:
    """Raises ValueError (what `pdserve serve` prints before exiting 2) for a configuration no engine
    can start with.

    colocated with one replica on the local launcher: the engine in this process (its own engine
    process). Otherwise (colocated replicas, one replica on Ray, or prefill and decode instances)
    instance processes (or Ray actors) behind the router."""
    from serving.launchers import make_specs
    if config.deploy.mode == "colocated" and config.deploy.num_replicas == 1 and config.deploy.launcher == "local":
        from serving.engine.async_llm import AsyncLLM
        return AsyncLLM.from_config(config)
    from serving.router.engine_client import build_disaggregated_client
    specs = make_specs(config)
    for spec in specs:
        check_instance_kv_pool(spec.config)
    return build_disaggregated_client(config)


def check_instance_kv_pool(config: Config) -> None:
    """ValueError if an instance built from `config` would refuse to start because its KV pool cannot
    hold one max-length sequence (build_engine checks that as it starts).

    An instance's error ends its process and reaches this process only as "instance X exited"; this
    says it, with the numbers and the flags to change, before any instance starts. Ray instances may
    run on other nodes: with the model directory absent here nothing is checked, and with dtype
    "auto" the pool is sized for the smallest dtype they could pick (bfloat16 unless --device cpu),
    so only what every node would refuse is refused."""
    import torch

    from kvcache.layout import KVCacheLayout
    from serving.engine.engine import resolve_max_model_len, resolve_model_dir
    from serving.engine.validation import check_kv_pool_fits
    from serving.models.config import ModelArchConfig
    from serving.runner.model_runner import resolve_device, resolve_dtype

    local = config.deploy.launcher == "local"
    model = config.model.model
    if not local and model is not None and not os.path.isfile(os.path.join(model, "config.json")):
        return
    arch = ModelArchConfig.from_model_dir(resolve_model_dir(model))
    max_model_len = resolve_max_model_len(config.model.max_model_len, arch)
    block_size = config.cache.block_size
    num_blocks = config.cache.num_blocks_override
    on_gpu_by_utilization = config.cache.kv_cache_memory_bytes is None and (
        resolve_device(config.model.device).type == "cuda" if local else config.model.device != "cpu")
    if num_blocks is None and on_gpu_by_utilization:
        return  # sized from the GPU's free memory at start (serving/runner/gpu_memory.py), checked there
    if num_blocks is None:
        device = (resolve_device(config.model.device) if local
                  else torch.device("cpu" if config.model.device == "cpu" else "cuda"))
        dtype = resolve_dtype(config.model.dtype, device)
        layout = KVCacheLayout.for_model(arch.num_layers, arch.num_kv_heads, arch.head_dim, block_size, dtype)
        num_blocks = layout.num_blocks_for_bytes(config.cache.kv_bytes)
    check_kv_pool_fits(num_blocks, block_size, max_model_len)
