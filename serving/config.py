"""One `Config` composed of one frozen dataclass per package, loaded from YAML plus CLI overrides.

YAML keys are the CLI flag names with dashes or underscores (`max-num-seqs` or `max_num_seqs`), flat or
grouped under `model:`, `cache:`, `scheduler:`, `parallel:`, `server:`, `deploy:`. CLI flags win over the
file.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from kvcache.config import CacheConfig, parse_bytes
from kvcache.layout import partition_counts
from scheduler.config import SchedulerConfig

_DTYPES = ("auto", "float32", "bfloat16", "float16")
MODES = ("colocated", "disaggregated")
LAUNCHERS = ("local", "ray")


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None  # local HF directory; None: the built-in tiny model
    served_model_name: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    seed: int = 0
    device: str = "auto"  # auto: cuda if available else cpu
    # run every step through the model's Python modules: no native decode step on CPU
    # (serving/models/native_decoder.py), as vLLM's flag turns off CUDA graphs
    enforce_eager: bool = False
    # CUDA graphs of decode steps (serving/runner/cuda_graphs.py), vLLM's --cuda-graph-sizes: None, 1, 2,
    # 4 and every 8 up to max_num_seqs (at most 512); one value N, the same up to N; several, those sizes
    # ("1,2,4,16" or a YAML list); 0, none. CPU ignores it
    cuda_graph_sizes: str | None = None

    def __post_init__(self) -> None:
        from serving.runner.cuda_graphs import normalize_sizes
        object.__setattr__(self, "cuda_graph_sizes", normalize_sizes(self.cuda_graph_sizes))
        if self.dtype not in _DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"--max-model-len must be at least 1, got {self.max_model_len}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")


@dataclass(frozen=True)
class ParallelConfig:
    """How one instance splits the model over devices: tensor-parallel ranks times pipeline stages, in
    every instance (serving/runner/tensor_parallel.py); KV moves between prefill and decode instances
    of any two plans (kvcache/transfer/plans.py)."""
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # layers of each pipeline stage, comma separated ("7,5"; vLLM's VLLM_PP_LAYER_PARTITION), or a list
    # in YAML; None: the even split, a remainder on the stages before the last (vLLM's)
    pp_layer_partition: str | None = None
    # how long a rank waits in a collective for a peer before the group is declared dead (a dead peer
    # is seen at once; this catches a hung one)
    collective_timeout_s: float = 60.0
    # set by the Ray launcher for an instance of more than one rank: the named placement group (one
    # bundle per rank, rank 0's actor in bundle 0) and the Ray namespace it lives in; the instance's
    # engine starts ranks 1.. as Ray actors in bundles 1.. (None: local processes)
    ray_placement_group: str | None = None
    ray_namespace: str | None = None

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a whole number of at least 1, got {value!r}")
        if not self.collective_timeout_s > 0:
            raise ValueError(f"parallel.collective_timeout_s must be positive, got {self.collective_timeout_s!r}")
        # normalized to "7,5" (a YAML list too) or None (the even split, "even" naming it); its sum is
        # checked against the model at load (kvcache/layout.py: check_partition)
        counts = partition_counts(self.pp_layer_partition)
        object.__setattr__(self, "pp_layer_partition", None if counts is None else ",".join(map(str, counts)))
        if counts is not None and (len(counts) != self.pipeline_parallel_size or min(counts) < 1):
            raise ValueError(f"--pp-layer-partition {self.pp_layer_partition!r}: give the layers of each of "
                             f"the {self.pipeline_parallel_size} pipeline stages (--pipeline-parallel-size), "
                             "comma separated, each at least 1 (e.g. 7,5 for a 12-layer model over 2)")

    @property
    def world_size(self) -> int:
        """Ranks (processes) of one instance: tensor-parallel ranks times pipeline stages."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    api_key: str | None = None
    max_request_bytes: int = 4 * 1024**2  # request bodies past this get a 413
    log_level: str = "info"
    # on SIGTERM/SIGINT: how long running requests may go on before they are ended with a 503
    # (vLLM's --shutdown-timeout); instances drain their own requests for as long
    shutdown_timeout_s: float = 30.0
    # slow clients: a connection whose request headers are not complete this long after it opened
    # (or after the previous response) is closed; a body not complete this long after its
    # headers gets a 408
    request_header_timeout_s: float = 10.0
    request_body_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if self.max_request_bytes < 1024:
            raise ValueError("--max-request-bytes must be at least 1024")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"--shutdown-timeout must be 0 or more seconds, got {self.shutdown_timeout_s}")
        for name in ("request_header_timeout_s", "request_body_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class DeployConfig:
    mode: str = "colocated"
    # colocated: data-parallel replicas; more than 1 runs them as instance processes behind the router
    num_replicas: int = 1
    num_prefill: int = 1
    num_decode: int = 1
    launcher: str = "local"
    ray_address: str | None = None
    # host the internal gRPC ports bind to; loopback keeps them off the network by default
    internal_host: str = "127.0.0.1"
    same_node: bool = False  # Ray: keep each prefill/decode pair on one node (placement group)
    # the engine core (scheduler, model, KV cache) in a process of its own, in colocated mode and in
    # each instance; False: a thread of the API server's (or instance's) process, as before
    engine_process: bool = True
    # where a colocated engine process computes (serving/engine/cpu_placement.py): nobind (one unpinned
    # thread per core), auto (every core but the last, a pinned thread each: vLLM's layout), or a core list
    cpu_threads_bind: str = "nobind"
    # every engine writes each step's shape and duration to DIR/<role>-<pid>.jsonl (scheduler/step_trace.py;
    # `pdserve profile --from-trace` fits a latency model from them); None: no trace
    step_trace_dir: str | None = None
    # config keys (model, cache, scheduler) that differ per role, e.g. {max_num_batched_tokens: 4096}
    prefill_overrides: dict = field(default_factory=dict)
    decode_overrides: dict = field(default_factory=dict)
    # Ray: what each instance actor holds (its torch threads follow num_cpus)
    num_cpus_per_instance: float = 1.0
    num_gpus_per_instance: float = 0.0
    # deadline of every router -> instance call, and the longest silence of an instance stream
    instance_timeout_s: float = 120.0
    instance_start_timeout_s: float = 300.0
    health_check_interval_s: float = 1.0
    restart_failed_instances: bool = True
    # start the prefill while the decode instance reserves the request's blocks (when the router's
    # estimate says it has them) instead of once it has accepted: 1-2 decode steps less TTFT
    prefill_while_reserving: bool = True
    # a decode instance dies mid-stream: prefill its requests again elsewhere (prompt + the tokens
    # already sent) instead of ending them with an error
    reprefill_on_decode_failure: bool = False
    # KV transfer (kvcache.transfer.TransferConfig): after the retries, recompute or fail
    kv_transfer_failure_policy: str = "recompute"
    kv_transfer_max_retries: int = 1
    kv_transfer_rpc_timeout_s: float = 10.0
    kv_transfer_stall_timeout_s: float = 30.0
    # a prefill instance holds a sent prompt's KV at most this long for the decode side's
    # acknowledgement, then cancels the send and frees the blocks (counted: num_leases_expired)
    kv_transfer_lease_ttl_s: float = 60.0
    kv_transfer_enable_shm: bool = True
    # a CRC-32 per chunk, verified on receive: a mismatch is refused (retried, then by the failure
    # policy), counted in num_checksum_mismatches, never decoded from
    kv_transfer_checksum: bool = False
    kv_transfer_layers_per_group: int = 1  # layers per send while prefill computes the rest

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        if self.num_prefill < 1 or self.num_decode < 1:
            raise ValueError("--num-prefill and --num-decode must be at least 1")
        if self.num_replicas < 1:
            raise ValueError(f"--num-replicas must be at least 1, got {self.num_replicas}")
        if self.num_replicas > 1 and self.mode != "colocated":
            raise ValueError("--num-replicas is for --mode colocated (data-parallel replicas); in disaggregated "
                             "mode use --num-prefill and --num-decode")
        for name in ("prefill_overrides", "decode_overrides"):
            _check_role_overrides(name, getattr(self, name))
        if self.cpu_threads_bind not in ("auto", "nobind"):
            parse_cores(self.cpu_threads_bind)
        if self.cpu_threads_bind not in ("auto", "nobind") and self.mode != "colocated":
            raise ValueError("--cpu-threads-bind with a core list is for --mode colocated: the instances of a "
                             "disaggregated deployment share their host and run unbound")
        if self.num_cpus_per_instance <= 0 or self.num_gpus_per_instance < 0:
            raise ValueError("--num-cpus-per-instance must be positive and --num-gpus-per-instance "
                             "not negative")
        for name in ("instance_timeout_s", "instance_start_timeout_s", "health_check_interval_s",
                     "kv_transfer_rpc_timeout_s", "kv_transfer_stall_timeout_s", "kv_transfer_lease_ttl_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.kv_transfer_failure_policy not in ("recompute", "fail"):
            raise ValueError("--kv-transfer-failure-policy must be recompute or fail, got "
                             f"{self.kv_transfer_failure_policy!r}")
        if not 0 <= self.kv_transfer_max_retries <= 3:
            raise ValueError(f"--kv-transfer-max-retries must be in [0, 3], got {self.kv_transfer_max_retries}")
        if self.kv_transfer_layers_per_group < 1:
            raise ValueError("--kv-transfer-layers-per-group must be at least 1")


def _check_role_overrides(name: str, overrides: dict) -> None:
    if not isinstance(overrides, dict):
        raise ValueError(f"deploy.{name} must be a mapping of config keys, got {type(overrides).__name__}")
    for key in overrides:
        norm = _ALIASES.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        if _FIELD_OWNER.get(norm) not in _ROLE_SECTIONS:
            raise ValueError(f"deploy.{name}: {key!r} is not a key that may differ per role; use keys of "
                             f"the model, cache, scheduler or parallel sections (e.g. max_num_batched_tokens)")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)

    def __post_init__(self) -> None:
        if self.parallel.world_size > 1 and self.deploy.cpu_threads_bind != "nobind":
            raise ValueError(f"--cpu-threads-bind {self.deploy.cpu_threads_bind} pins one engine process's threads; "
                             "with --tensor-parallel-size or --pipeline-parallel-size above 1 each rank is a process "
                             "of its own, each with its share of the cores: leave --cpu-threads-bind at nobind")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """Build from flat or grouped keys; an unknown key is an error that names the known ones."""
        flat: dict[str, Any] = {}
        for key, value in (values or {}).items():
            norm = key.replace("-", "_")
            if norm in _SECTIONS and isinstance(value, dict):
                flat.update({k.replace("-", "_"): v for k, v in value.items()})
            else:
                flat[norm] = value
        flat = {_ALIASES.get(k, k): v for k, v in flat.items()}
        if "kv_cache_memory_bytes" in flat and flat["kv_cache_memory_bytes"] is not None:
            flat["kv_cache_memory_bytes"] = parse_bytes(flat["kv_cache_memory_bytes"])
        unknown = sorted(k for k in flat if k not in _FIELD_OWNER)
        if unknown:
            raise ValueError(f"unknown config key(s) {', '.join(unknown)}; known keys: "
                             f"{', '.join(sorted(_FIELD_OWNER))}")
        parts: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        for key, value in flat.items():
            parts[_FIELD_OWNER[key]][key] = value
        return cls(**{name: _SECTIONS[name](**kwargs) for name, kwargs in parts.items()})

    @classmethod
    def load(cls, yaml_path: str | None = None, overrides: dict[str, Any] | None = None) -> "Config":
        values: dict[str, Any] = {}
        if yaml_path:
            with open(yaml_path) as f:
                loaded = yaml.safe_load(f) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{yaml_path}: expected a mapping of config keys at the top level")
            values.update(loaded)
        merged = cls.from_dict(values)
        if overrides:
            merged = merged.replace(**overrides)
        return merged

    def replace(self, **flat_changes: Any) -> "Config":
        """Return a copy with flat keys changed (e.g. max_num_seqs=8)."""
        groups: dict[str, dict[str, Any]] = {}
        for key, value in flat_changes.items():
            key = _ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
            if key not in _FIELD_OWNER:
                raise ValueError(f"unknown config key {key!r}")
            if key == "kv_cache_memory_bytes" and value is not None:
                value = parse_bytes(value)
            groups.setdefault(_FIELD_OWNER[key], {})[key] = value
        return dataclasses.replace(self, **{
            name: dataclasses.replace(getattr(self, name), **changes) for name, changes in groups.items()})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}


_SECTIONS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
             "parallel": ParallelConfig, "server": ServerConfig, "deploy": DeployConfig}
_FIELD_OWNER = {f.name: name for name, klass in _SECTIONS.items() for f in dataclasses.fields(klass)}
_ROLE_SECTIONS = ("model", "cache", "scheduler", "parallel")
_ALIASES = {"num_gpu_blocks_override": "num_blocks_override", "enable_prefix_caching": "enable_prefix_caching",
            "shutdown_timeout": "shutdown_timeout_s"}


def parse_cores(text: str) -> tuple[int, ...]:
    """'0-2,5' -> (0, 1, 2, 5); a ValueError that says what is wrong."""
    cores: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if not match:
            raise ValueError(f"--cpu-threads-bind must be auto, nobind or a core list such as 0-2,5; got {text!r}")
        lo, hi = int(match[1]), int(match[2] or match[1])
        cores += range(lo, hi + 1)
    if not cores or len(set(cores)) != len(cores):
        raise ValueError(f"--cpu-threads-bind {text!r}: the cores must be distinct")
    return tuple(cores)
