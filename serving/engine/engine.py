"""`Engine`: the serving side of one engine — the EngineCore step loop built from its parts, plus what
the API needs to turn a client's request into a `Request` (validation against the model) and the
engine's state into stats.

    build_engine(config, role)     model, KV layout and tensors, connector worker, runner (Executor),
                                   block pool, KV manager, policies, connector policy, Scheduler,
                                   EngineCore — every part injected into the next

Every mode drives an Engine: in-process for colocated serving and the offline LLM API, inside each
instance process in disaggregated mode (role prefill or decode).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from kvcache.allocation import make_strategy
from kvcache.block_pool import BlockPool
from kvcache.host_tier import HostTier
from kvcache.kv_manager import KVCacheManager
from kvcache.transfer.layout import KVLayout
from scheduler.clock import Clock, MonotonicClock
from scheduler.connectors import ConnectorPolicy, NullConnector, RemoteDecode, RemotePrefill
from scheduler.engine_core import EngineCore, EngineCoreOutput
from scheduler.policies import make_preemption
from scheduler.request import Request, RequestStatus
from scheduler.sampling_params import SamplingParams
from scheduler.scheduler import RequestTooLargeError, Scheduler
from scheduler.step_trace import StepTrace
from serving.config import Config
from serving.engine.protocol import EngineStats, RequestRejectedError
from serving.engine.validation import check_kv_pool_fits, check_stop_token_ids
from serving.kv_connector.base import KVConnectorWorker
from serving.kv_connector.swap import ComposedWorker, SwapWorker
from serving.kv_connector.transfer import make_worker, model_fingerprint, wants_shared_pool
from serving.models import ModelArchConfig, load_model
from serving.runner.cuda_graphs import capture_sizes
from serving.runner.gpu_memory import gpu_kv_budget
from serving.runner.model_runner import (ModelRunner, model_kv_layout, num_kv_blocks, pool_layout, resolve_device,
                                         resolve_dtype)

logger = logging.getLogger(__name__)


def resolve_model_dir(model: str | None) -> str:
    if model is None:
        from serving.models.default_model import ensure_default_model
        return ensure_default_model()
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"--model {model!r} is not a local Hugging Face model directory (no config.json); "
                         "pdserve loads models from disk: pass a directory, or make one with "
                         "`pdserve make-model --size tiny --out DIR`")
    return model


def resolve_max_model_len(requested: int | None, arch: ModelArchConfig) -> int:
    limit = arch.max_position_embeddings
    if arch.sliding_window:
        limit = min(limit, arch.sliding_window)
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"--max-model-len {requested} exceeds what the model supports ({limit}: "
                         "max_position_embeddings or sliding window); lower it")
    return requested


def make_connector_policy(role: str, config: Config, num_layers: int) -> ConnectorPolicy:
    deploy = config.deploy
    if role == "decode":
        return RemotePrefill(deploy.kv_transfer_stall_timeout_s, deploy.kv_transfer_failure_policy)
    if role == "prefill":
        return RemoteDecode(deploy.kv_transfer_lease_ttl_s, num_layers, deploy.kv_transfer_layers_per_group)
    return NullConnector()


@dataclass
class Engine:
    core: EngineCore
    runner: ModelRunner
    connector: KVConnectorWorker
    kv_layout: KVLayout  # what KV peers must agree on (layout + model fingerprint)
    model_dir: str
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    role: str = "colocated"

    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    @property
    def kv(self) -> KVCacheManager:
        return self.core.scheduler.kv

    # ---- requests ----
    def make_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     client_id: str = "", priority: int = 0, kv_peer: str | None = None,
                     remote_prefill: bool = False) -> Request:
        """A Request for this model; RequestRejectedError (a ValueError) says why one cannot be served."""
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestRejectedError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        check_stop_token_ids(params.stop_token_ids, self.vocab_size)
        try:
            return Request(request_id, prompt_token_ids, params, self.eos_token_ids, self.max_model_len,
                           client_id, priority=priority, kv_peer=kv_peer, remote_prefill=remote_prefill)
        except ValueError as e:
            raise RequestRejectedError(str(e)) from e

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    **request_kwargs) -> None:
        """Queue a request (kwargs: client_id, priority, kv_peer, remote_prefill). Raises
        RequestRejectedError, or NoKVSpaceError for a remote prefill that found no room."""
        request = self.make_request(request_id, prompt_token_ids, params, **request_kwargs)
        try:
            self.core.add_request(request)
        except (RequestTooLargeError, ValueError) as e:
            raise RequestRejectedError(str(e)) from e

    def step(self) -> list[EngineCoreOutput]:
        return self.core.step()

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED,
                       stop_reason: int | str | None = None) -> list[EngineCoreOutput]:
        return self.core.abort_requests(request_ids, status, stop_reason)

    def set_first_token(self, request_id: str, token_id: int) -> None:
        self.core.set_first_token(request_id, token_id)

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    @property
    def last_step_idle(self) -> bool:
        return self.core.last_step_idle

    # ---- introspection ----
    def get_stats(self) -> EngineStats:
        scheduler = self.scheduler
        extra = {"kv_transfer": self.transfer_counters(), "histograms": self.connector.histograms(),
                 "client_service": scheduler.ordering.service(),  # per client, --scheduling-policy vtc
                 "kv_swap": self.swap_counters()}
        if hasattr(scheduler.preemption, "host_usage"):  # --preemption-mode swap
            extra["host_kv_usage"] = scheduler.preemption.host_usage()
        return EngineStats(
            num_running=scheduler.num_running, num_waiting=scheduler.num_waiting, num_swapped=scheduler.num_swapped,
            kv_cache_usage=self.kv.pool.usage, num_preemptions=scheduler.num_preemptions,
            prefix_cache_queries=self.kv.num_prefix_queries, prefix_cache_hits=self.kv.num_prefix_hits,
            extra=extra)

    def swap_counters(self) -> dict[str, float]:
        """Preemptions by mode, and with --preemption-mode swap the swap worker's moves, bytes and time."""
        values = dict(self.scheduler.preemption.counters())
        swap = getattr(self.connector, "swap", None)
        if swap is not None:
            values.update(swap.counters())
        return values

    def transfer_counters(self) -> dict[str, float]:
        """The connector worker's counters and the connector policy's, by name."""
        values = dict(self.connector.counters())
        for name, value in self.scheduler.connector.counters().items():
            values[name] = values.get(name, 0) + value
        return values

    def num_queued_prefill_tokens(self) -> int:
        """Prompt tokens admitted but not yet computed (what a new prefill would wait behind)."""
        requests = list(self.scheduler.waiting) + self.scheduler.running
        return sum(max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in requests)

    def check_integrity(self) -> None:
        self.core.check_integrity()

    def close(self) -> None:
        self.connector.close()
        self.runner.close()
        if self.core.trace is not None:
            self.core.trace.close()


def _allocate_shared(layout, num_blocks: int, device):
    """The KV pool one-sided writers can write (shared memory, or a GPU's with its control words in shared
    memory), or None (logged) when /dev/shm cannot hold it."""
    try:
        return layout.allocate_shared(num_blocks, device)
    except OSError as e:
        logger.warning("KV pool not in shared memory (%s): same-host prefill instances will send it payloads "
                       "instead of writing it themselves; enlarge /dev/shm to enable one-sided writes", e)
        return None


def _allocation(config: Config):
    """The block allocation strategy (--block-allocation; auto: block groups when swapping)."""
    name = config.cache.block_allocation
    if name == "auto":
        name = "groups" if config.scheduler.preemption_mode == "swap" else "lru"
    return make_strategy(name)


def _num_host_blocks(config: Config, layout, stage) -> int:
    """Blocks in --swap-space GiB per rank (every rank of a group holds as many, of its own heads and
    stage's layers: the same block ids), sized by the largest rank's blocks (`pool_layout`: the
    pipeline stage of the most layers); 0 without swapping."""
    if config.scheduler.preemption_mode != "swap":
        return 0
    layout = pool_layout(layout, stage)
    num_host_blocks = int(config.cache.swap_space * 2**30) // layout.bytes_per_block
    if num_host_blocks < 1:
        raise ValueError(f"--swap-space {config.cache.swap_space:g} GiB holds no KV block of "
                         f"{layout.bytes_per_block} bytes: raise --swap-space")
    return num_host_blocks


def _host_tier(config: Config, layout, kv_cache, connector, num_host_blocks: int):
    """--preemption-mode swap: the host tier's blocks (accounting for the scheduler, a tensor for the
    swap worker, pinned on CUDA) and the connector worker with a swap worker beside it."""
    # never zeroed: a host block is read only after a swap-out wrote it
    host_cache = torch.empty(layout.shape(num_host_blocks), dtype=kv_cache.dtype,
                             pin_memory=kv_cache.is_cuda)
    logger.info("host KV tier: %d blocks (%.1f MiB) for swapped-out requests", num_host_blocks,
                host_cache.numel() * host_cache.element_size() / 2**20)
    host = HostTier(num_host_blocks, layout.block_size, config.cache.enable_prefix_caching, _allocation(config))
    return host, ComposedWorker(connector, SwapWorker(kv_cache, host_cache))


def build_engine(config: Config, role: str = "colocated", clock: Clock | None = None,
                 token: str | None = None) -> Engine:
    """Every part from the config, each injected into the next. For a decode role the connector
    worker starts serving KVTransfer on deploy.internal_host; token: the deployment's, for every
    internal KV call (None: no check)."""
    model_dir = resolve_model_dir(config.model.model)
    device = resolve_device(config.model.device)
    dtype = resolve_dtype(config.model.dtype, device)
    tp, pp = config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size
    workers = None
    if tp > 1 or pp > 1:  # ranks 1.. spawned; this process is rank 0 (serving/runner/tensor_parallel.py)
        from serving.models.pipeline import layer_partition
        from serving.models.tensor_parallel import check_tensor_parallel
        from serving.runner.parallel_group import start_tensor_parallel
        arch = ModelArchConfig.from_model_dir(model_dir)
        check_tensor_parallel(arch, tp)
        parallel = config.parallel
        partition = layer_partition(arch.num_layers, pp, parallel.pp_layer_partition) if pp > 1 else ()
        workers, model = start_tensor_parallel(model_dir, dtype, device, config.cache, tp, config.model.seed,
                                               parallel.collective_timeout_s, parallel.ray_placement_group,
                                               parallel.ray_namespace, config.model.enforce_eager, pp, partition)
    else:
        model = load_model(model_dir, dtype, device)
    try:
        return _build_engine_on(model, workers, config, role, model_dir, device, clock, token)
    except BaseException:
        if workers is not None:
            workers.close()
        raise


def _build_engine_on(model, workers, config: Config, role: str, model_dir: str, device, clock: Clock | None,
                     token: str | None) -> Engine:
    arch = model.config  # with tensor parallelism, this rank's share of the heads
    max_model_len = resolve_max_model_len(config.model.max_model_len, arch)
    layout = model_kv_layout(model, config.cache.block_size)
    stage = getattr(model, "pipeline_stage", None)  # this rank's (stage 0's) layers: the layout declares the model's
    budget = None
    if device.type == "cuda" and config.cache.kv_cache_memory_bytes is None and not config.cache.num_blocks_override:
        budget = gpu_kv_budget(getattr(model, "full_config", arch), device, config.cache.gpu_memory_utilization,
                               config.scheduler.max_num_batched_tokens, config.scheduler.max_num_seqs,
                               next(model.parameters()).dtype, layout.tp_size)
    num_blocks = num_kv_blocks(pool_layout(layout, stage), config.cache, budget)  # every rank's within the budget
    check_kv_pool_fits(num_blocks, config.cache.block_size, max_model_len)
    num_host_blocks = _num_host_blocks(config, layout, stage)
    pool = _allocate_shared(layout, num_blocks, device) if wants_shared_pool(role, config, device) else None
    kv_cache = pool.tensor if pool is not None else layout.allocate(num_blocks, device)
    logger.info("KV cache: %d blocks of %d tokens (%.1f MiB%s%s)", num_blocks, layout.block_size,
                num_blocks * layout.bytes_per_block / 2**20, f" per rank, {layout.tp_size} ranks" if workers else "",
                f", shared with one-sided writers ({pool.name})" if pool else "")
    kv_caches = [kv_cache]
    if workers is not None:  # an instance that moves KV maps every rank's cache: its transfer endpoint is here
        workers.ready(num_blocks, layout.block_size, share_caches_of=layout if role != "colocated" else None,
                      num_host_blocks=num_host_blocks)
        kv_caches += workers.rank_caches
    kv_layout = KVLayout.from_cache_layout(layout, model_fingerprint(model_dir), stage.partition if stage else ())
    connector = make_worker(role, config, kv_caches, kv_layout, config.deploy.internal_host, token, pool)
    host = None
    if config.scheduler.preemption_mode == "swap":
        host, connector = _host_tier(config, layout, kv_cache, connector, num_host_blocks)
    if workers is not None:
        from serving.runner.tensor_parallel import TensorParallelRunner
        runner = TensorParallelRunner(workers, model, kv_cache, layout, device, config.model.seed, connector,
                                      config.model.enforce_eager)
    else:
        runner = ModelRunner(model, kv_cache, layout, device, config.model.seed, connector,
                             config.model.enforce_eager)
        if device.type == "cuda" and role != "prefill":  # a prefill instance never decodes; --enforce-eager
            runner.capture_decode_graphs(capture_sizes(config.model.cuda_graph_sizes, config.scheduler.max_num_seqs),
                                         max_model_len, progress=True)
    clock = clock or MonotonicClock()
    pool = BlockPool(num_blocks, config.cache.enable_prefix_caching, _allocation(config))
    kv = KVCacheManager(pool, config.cache.block_size)
    scheduler = Scheduler(config.scheduler, kv, max_model_len, make_connector_policy(role, config, arch.num_layers),
                          clock, preemption=make_preemption(config.scheduler.preemption_mode, host))
    trace = StepTrace.in_dir(config.deploy.step_trace_dir, role) if config.deploy.step_trace_dir else None
    if trace is not None:
        logger.info("step trace: %s", trace.path)
    return Engine(EngineCore(scheduler, runner, clock, trace), runner, connector, kv_layout, model_dir, max_model_len,
                  arch.eos_token_ids, arch.vocab_size, role)
