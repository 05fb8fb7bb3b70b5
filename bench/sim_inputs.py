"""Between bench and the simulator: a deployment YAML (the one `pdserve serve --config` reads) and a
cluster description become a `SimDeployment`; bench's workloads and arrival processes become the
simulator's conversations; simulated records become bench's `RequestRecord`s, so that a simulated run
goes through exactly the metric, report and plot code of a measured one.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import yaml

from bench.arrivals import arrival_times
from bench.config import LoadConfig
from bench.datasets import Workload
from bench.prompts import PromptSynthesizer
from bench.records import RequestRecord
from kvcache.layout import KVCacheLayout
from scheduler.latency_plans import CommModel, LatencyModelSet
from scheduler.planner.cluster import ClusterSpec
from scheduler.planner.placement import pack_first_fit
from scheduler.planner.sizing import ModelShape, dtype_bytes
from scheduler.simulator import LinkSpec, SimConversation, SimDeployment, SimInstanceSpec, SimRecord, SimTurn
from serving.config import Config
from serving.models.pipeline import layer_partition

logger = logging.getLogger(__name__)

_ARRIVAL_SEED_OFFSET = 1  # as bench/runner.py: arrivals draw from their own stream


# ---- the model and the cluster ----
def model_shape(model_dir: str | None) -> ModelShape:
    """The shape of a model directory, or of its config.json alone (None: the built-in tiny model).
    Raises ValueError for a directory without config.json or an architecture pdserve does not support."""
    from serving.engine.engine import resolve_model_dir
    from serving.models.config import ModelArchConfig

    if model_dir is not None and Path(model_dir).is_file() and Path(model_dir).name == "config.json":
        model_dir = str(Path(model_dir).parent)
    path = resolve_model_dir(model_dir)
    try:
        arch = ModelArchConfig.from_model_dir(path)
    except KeyError as e:
        raise ValueError(f"{path}/config.json lacks {e}; is it a Hugging Face Llama/Qwen/Mistral config?") from None
    return ModelShape(Path(path).name, arch.num_layers, arch.hidden_size, arch.intermediate_size, arch.num_heads,
                      arch.num_kv_heads, arch.head_dim, arch.vocab_size, arch.max_position_embeddings,
                      arch.tie_word_embeddings)


def load_cluster(path: str) -> ClusterSpec:
    try:
        with open(path) as handle:
            values = yaml.safe_load(handle)
    except OSError as e:
        raise ValueError(f"cannot read the cluster description {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML ({e}); see deploy/clusters/example.yaml") from None
    return ClusterSpec.from_dict(values, where=path)


# this 2-core box, when no cluster is given: one node, shared-memory KV transfer (docs/kv_transfer.md)
LOCAL_CLUSTER = ClusterSpec(nodes=1, devices_per_node=2, device_memory_gib=16, intra_node_bandwidth_gbps=8,
                            inter_node_bandwidth_gbps=4, device="cpu", name="this machine")


# ---- the deployment ----
def role_configs(config: Config) -> list[tuple[str, str, Config]]:
    """(name, role, config with the role's overrides) of every instance, named as the launchers name
    them (serving/launchers/base.py)."""
    deploy = config.deploy
    if deploy.mode == "colocated":
        return [(f"replica-{i}", "colocated", config) for i in range(deploy.num_replicas)]
    prefill = config.replace(**deploy.prefill_overrides) if deploy.prefill_overrides else config
    decode = config.replace(**deploy.decode_overrides) if deploy.decode_overrides else config
    return ([(f"prefill-{i}", "prefill", prefill) for i in range(deploy.num_prefill)]
            + [(f"decode-{i}", "decode", decode) for i in range(deploy.num_decode)])


def resolve_dtype(config: Config, latency: LatencyModelSet) -> str:
    """The KV dtype: the configured one, else ("auto") the one the latency model was profiled in."""
    if config.model.dtype != "auto":
        return config.model.dtype
    return latency.dtype or "float32"


def _pool_layout(layout: KVCacheLayout, parallel) -> KVCacheLayout:
    """The rank layout the engine sizes its pools by (serving/runner/model_runner.py: pool_layout): its
    heads, the layers of its largest pipeline stage."""
    rank = layout.rank_slice(parallel.tensor_parallel_size, 0)
    pp = parallel.pipeline_parallel_size
    return rank if pp == 1 else rank.largest_stage(layer_partition(layout.num_layers, pp, parallel.pp_layer_partition))


def _num_blocks(role_config: Config, rank: KVCacheLayout, shape: ModelShape, dtype: str, cluster: ClusterSpec) -> int:
    """The instance's KV blocks as the engine sizes them: --num-gpu-blocks-override, else the budget
    given, else on a GPU cluster what --gpu-memory-utilization of a device leaves after the rank's share
    of the weights and a step's activations (serving/runner/gpu_memory.py; the CUDA context's few hundred
    MiB are not counted), else the CPU default of 512 MiB."""
    cache = role_config.cache
    if cache.num_blocks_override:
        return cache.num_blocks_override
    if cache.kv_cache_memory_bytes is not None or cluster.device != "gpu" or role_config.model.device == "cpu":
        return rank.num_blocks_for_bytes(cache.kv_bytes)
    from serving.runner.gpu_memory import activation_bytes, kv_budget_from_utilization
    parallel, scheduler = role_config.parallel, role_config.scheduler
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    total = cluster.device_memory_bytes
    weights = shape.weight_bytes(dtype) // (tp * pp)
    activations = activation_bytes(_arch(role_config), scheduler.max_num_batched_tokens, scheduler.max_num_seqs,
                                   dtype_bytes(dtype), tp)
    return rank.num_blocks_for_bytes(kv_budget_from_utilization(total, total - weights, activations,
                                                                cache.gpu_memory_utilization))


def _check_profiled_split(name: str, step_latency, num_layers: int, parallel) -> None:
    """Warn where a pipelined instance splits its layers otherwise than the profile it is priced by."""
    profiled = getattr(step_latency, "meta", {}).get("pp_partition")
    pp = parallel.pipeline_parallel_size
    if pp > 1 and profiled:
        served = layer_partition(num_layers, pp, parallel.pp_layer_partition)
        if tuple(profiled) != served:
            logger.warning("%s: its stages hold %s layers, but its latency model was profiled with stages of %s "
                           "(pdserve profile --pp-layer-partition %s to price this split)", name,
                           ",".join(map(str, served)), ",".join(map(str, profiled)), ",".join(map(str, served)))


def sim_deployment(config: Config, latency: LatencyModelSet, cluster: ClusterSpec | None = None,
                   max_concurrency: int | None = None) -> SimDeployment:
    """The deployment `pdserve serve --config` would start, as the simulator wants it: the same
    instances, each with the KV pool the runtime would size (`_num_blocks`: on a GPU cluster without a
    budget, from the cluster's device memory), the step latency of its TP x PP plan, and a node (packed
    first-fit on the cluster; default: this machine)."""
    from serving.engine.engine import resolve_max_model_len
    from serving.engine.validation import check_kv_pool_fits

    cluster = cluster or LOCAL_CLUSTER
    shape = model_shape(config.model.model)
    instances = []
    roles = role_configs(config)
    devices = [c.parallel.tensor_parallel_size * c.parallel.pipeline_parallel_size for _, _, c in roles]
    nodes = pack_first_fit(devices, cluster) if cluster.nodes > 1 else [0] * len(roles)
    if config.deploy.same_node and cluster.nodes > 1:
        nodes = _pair_nodes(roles, devices, cluster)
    for (name, role, role_config), node in zip(roles, nodes):
        dtype = resolve_dtype(role_config, latency)
        block_size = role_config.cache.block_size
        tp, pp = role_config.parallel.tensor_parallel_size, role_config.parallel.pipeline_parallel_size
        layout = KVCacheLayout.for_model(shape.num_layers, shape.num_kv_heads, shape.head_dim, block_size, dtype)
        cache = role_config.cache
        # the pools as the engine sizes them: the budget is per rank, the device pool and the host tier
        # in blocks of a rank's heads and the largest stage's layers (serving/engine/engine.py)
        rank = _pool_layout(layout, role_config.parallel)
        num_blocks = _num_blocks(role_config, rank, shape, dtype, cluster)
        max_model_len = resolve_max_model_len(role_config.model.max_model_len, _arch(role_config))
        check_kv_pool_fits(num_blocks, block_size, max_model_len)
        comm = CommModel(shape.num_layers, shape.hidden_size, dtype_bytes(dtype), cluster.intra_node_bytes_per_s,
                         cluster.intra_node_bytes_per_s if tp * pp <= cluster.devices_per_node
                         else cluster.inter_node_bytes_per_s)
        step_latency, _ = latency.for_plan(tp, pp, comm)
        _check_profiled_split(name, step_latency, shape.num_layers, role_config.parallel)
        instances.append(SimInstanceSpec(name, role, role_config.scheduler, num_blocks, block_size, max_model_len,
                                         step_latency, layout.bytes_per_block // block_size, shape.num_layers,
                                         node, tp, pp, cache.enable_prefix_caching,
                                         int(cache.swap_space * 2**30) // rank.bytes_per_block,
                                         rank.bytes_per_block))
    deploy = config.deploy
    links = LinkSpec(cluster.intra_node_bytes_per_s, cluster.inter_node_bytes_per_s, cluster.transfer_latency_ms / 1e3,
                     deploy.kv_transfer_layers_per_group)
    return SimDeployment(tuple(instances), links, poll_interval_s=deploy.health_check_interval_s,
                         instance_timeout_s=deploy.instance_timeout_s,
                         kv_transfer_lease_ttl_s=deploy.kv_transfer_lease_ttl_s,
                         kv_transfer_stall_timeout_s=deploy.kv_transfer_stall_timeout_s,
                         kv_transfer_failure_policy=deploy.kv_transfer_failure_policy,
                         prefill_while_reserving=deploy.prefill_while_reserving, max_concurrency=max_concurrency)


def _arch(config: Config):
    from serving.engine.engine import resolve_model_dir
    from serving.models.config import ModelArchConfig
    return ModelArchConfig.from_model_dir(resolve_model_dir(config.model.model))


def _pair_nodes(roles: list[tuple[str, str, Config]], devices: list[int], cluster: ClusterSpec) -> list[int]:
    """same_node: prefill-i and decode-i packed together (as the Ray launcher's placement groups)."""
    prefills = [i for i, (_, role, _) in enumerate(roles) if role == "prefill"]
    decodes = [i for i, (_, role, _) in enumerate(roles) if role == "decode"]
    order = [i for pair in zip(prefills, decodes) for i in pair]
    order += [i for i in range(len(roles)) if i not in order]
    packed = pack_first_fit([devices[i] for i in order], cluster)
    nodes = [0] * len(roles)
    for i, node in zip(order, packed):
        nodes[i] = node
    return nodes


# ---- the workload ----
class LengthSynthesizer(PromptSynthesizer):
    """Prompts of a length and nothing else: the simulator needs token counts only. Text from a file
    (ShareGPT, JSONL) is still counted with the model's tokenizer when there is one."""

    def text(self, num_tokens: int, rng: np.random.Generator) -> tuple[str, int]:
        return "", num_tokens

    def token_ids(self, num_tokens: int, rng: np.random.Generator) -> list[int]:
        return [0] * num_tokens


def prompt_overhead(tokenizer, chat: bool = False) -> int:
    """Tokens the server adds to a prompt the client counted without special tokens (BOS; on the chat
    endpoint, the chat template around one message)."""
    if tokenizer is None:
        return 0
    plain = len(tokenizer.encode("hello", add_special_tokens=False))
    if chat and getattr(tokenizer, "chat_template", None):
        templated = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                                  tokenize=True)
        return max(0, len(templated) - plain)
    return max(0, len(tokenizer.encode("hello")) - plain)


def sim_conversations(workload: Workload, load: LoadConfig, seed: int, extra_prompt_tokens: int = 0) -> list[SimConversation]:
    """The workload's conversations at the load's arrival process, drawn exactly as `pdserve bench`
    draws them (same seed, same stream), so a simulated and a measured run see the same requests."""
    rng = np.random.default_rng([seed, _ARRIVAL_SEED_OFFSET])
    arrivals = arrival_times(load, len(workload.conversations), rng, workload.trace_times_s)
    return [SimConversation(c.conversation_id, float(t),
                            tuple(SimTurn(turn.num_input_tokens + extra_prompt_tokens, turn.num_output_tokens)
                                  for turn in c.turns), c.tenant, workload.think_time_s)
            for c, t in zip(workload.conversations, arrivals)]


def tiled_conversations(base: list[SimConversation], load: LoadConfig, seed: int,
                        num_requests: int) -> list[SimConversation]:
    """`num_requests` conversations whose lengths cycle through `base`, at the load's arrival process
    (the planner wants more requests for a larger deployment than the workload holds)."""
    rng = np.random.default_rng([seed, _ARRIVAL_SEED_OFFSET])
    trace = [c.arrival_s for c in base] if load.arrival == "trace" else None
    if trace is not None and num_requests > len(base):
        span = (trace[-1] - trace[0]) or 1.0
        trace = [trace[i % len(trace)] + (i // len(trace)) * span for i in range(num_requests)]
    elif trace is not None:
        trace = trace[:num_requests]
    arrivals = arrival_times(load, num_requests, rng, trace)
    return [SimConversation(i, float(t), base[i % len(base)].turns, base[i % len(base)].tenant,
                            base[i % len(base)].think_time_s)
            for i, t in zip(range(num_requests), arrivals)]


# ---- the records ----
def to_request_record(record: SimRecord) -> RequestRecord:
    times = record.token_times_s
    success = record.success
    return RequestRecord(
        request_id=record.request_id, tenant=record.tenant, conversation_id=record.conversation_id,
        turn_index=record.turn_index, num_prompt_tokens=record.num_prompt_tokens,
        num_output_tokens=len(times) if success else 0, max_output_tokens=record.max_output_tokens,
        arrival_s=record.arrival_s, start_s=record.start_s, success=success,
        ttft_s=times[0] - record.start_s if success else 0.0,
        itl_s=[b - a for a, b in zip(times, times[1:])] if success else [],
        e2el_s=times[-1] - record.start_s if success else 0.0, error=record.error)


def to_request_records(records: list[SimRecord]) -> list[RequestRecord]:
    return [to_request_record(r) for r in records]
