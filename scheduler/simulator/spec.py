"""What a simulation takes and gives, as plain data: a deployment of instances on nodes with links
between them, a workload of conversations, and one record per request.

The simulator imports nothing from serving/ or bench/: bench/ builds these from a deployment YAML, a
cluster description and its own datasets and arrival processes, and turns the records back into the
benchmark's `RequestRecord`s.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.config import SchedulerConfig

ROLES = ("colocated", "prefill", "decode")
# which part of a disaggregated deployment to simulate: all of it, or one phase alone with the other
# ideal (instant KV hand-off, as the placement planner's per-phase search wants)
PHASES = ("both", "prefill", "decode")


@dataclass(frozen=True)
class SimInstanceSpec:
    """One instance: its role, its scheduler and KV pool, where it runs and how fast it steps."""
    name: str
    role: str
    scheduler: SchedulerConfig
    num_blocks: int
    block_size: int
    max_model_len: int
    latency: object  # a LatencyModel or PlanLatency: prefill_time, decode_time, prefill.a, decode.a
    kv_bytes_per_token: int  # K and V of one token, every layer (what a transfer moves per prompt token)
    num_layers: int
    node: int = 0
    tp: int = 1
    pp: int = 1
    enable_prefix_caching: bool = True
    num_host_blocks: int = 0  # the host tier of --preemption-mode swap
    swap_block_bytes: int = 0  # one KV block on one rank (its heads and stage's layers): what a swap copies

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"instance {self.name}: role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.num_blocks < 1 or self.block_size < 1 or self.max_model_len < 2:
            raise ValueError(f"instance {self.name}: needs at least one KV block and a context of 2 tokens")

    @property
    def num_devices(self) -> int:
        return self.tp * self.pp


@dataclass(frozen=True)
class LinkSpec:
    """KV transfer links: bytes per second between two devices of one node and of two nodes, and the
    fixed cost of one transfer (handshake and commit round trips)."""
    intra_node_bytes_per_s: float = 1e9
    inter_node_bytes_per_s: float = 1e9
    transfer_latency_s: float = 0.0
    layers_per_group: int = 1  # layers per send while prefill computes the rest (as the runtime)

    def __post_init__(self) -> None:
        if self.intra_node_bytes_per_s <= 0 or self.inter_node_bytes_per_s <= 0 or self.transfer_latency_s < 0:
            raise ValueError("link bandwidths must be positive and the transfer latency not negative")
        if self.layers_per_group < 1:
            raise ValueError("layers_per_group must be at least 1")


@dataclass(frozen=True)
class SimDeployment:
    instances: tuple[SimInstanceSpec, ...]
    links: LinkSpec = field(default_factory=LinkSpec)
    phase: str = "both"
    # the router's view of decode instances' free blocks is as of its last poll (health check interval)
    poll_interval_s: float = 1.0
    # a request no decode instance has room for waits at the router at most this long, then fails
    instance_timeout_s: float = 120.0
    kv_transfer_lease_ttl_s: float = 60.0
    kv_transfer_stall_timeout_s: float = 30.0
    kv_transfer_failure_policy: str = "recompute"
    # the router starts the prefill while the decode instance reserves, when its estimate has room
    prefill_while_reserving: bool = True
    max_concurrency: int | None = None  # client-side cap on requests in flight (bench --max-concurrency)

    def __post_init__(self) -> None:
        if not self.instances:
            raise ValueError("a deployment needs at least one instance")
        names = [i.name for i in self.instances]
        if len(set(names)) != len(names):
            raise ValueError(f"instance names must be distinct, got {names}")
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {self.phase!r}")
        roles = {i.role for i in self.instances}
        if "colocated" in roles and roles != {"colocated"}:
            raise ValueError("colocated replicas and prefill/decode instances cannot be mixed in one deployment")
        needed = {"both": {"prefill", "decode"}, "prefill": {"prefill"}, "decode": {"decode"}}[self.phase]
        if roles != {"colocated"} and not needed <= roles:
            raise ValueError(f"a disaggregated deployment needs {' and '.join(sorted(needed))} instances, "
                             f"got {', '.join(sorted(roles))}")

    @property
    def colocated(self) -> bool:
        return self.instances[0].role == "colocated"

    @property
    def num_devices(self) -> int:
        return sum(i.num_devices for i in self.instances)


@dataclass(frozen=True)
class SimTurn:
    num_input_tokens: int  # this turn's new prompt tokens (the history comes on top, as bench sends it)
    num_output_tokens: int  # max_tokens; the simulated reply is exactly this long (as with --ignore-eos)


@dataclass(frozen=True)
class SimConversation:
    """Turn k+1 arrives think_time_s after turn k's last token, with turn k's prompt and reply in its
    prompt (a single-turn request is a conversation of one turn)."""
    conversation_id: int
    arrival_s: float
    turns: tuple[SimTurn, ...]
    tenant: str = "default"
    think_time_s: float = 0.0


@dataclass
class SimRecord:
    """One request, its times on the simulation's clock (seconds after the first arrival), and where
    its time went (for bottleneck attribution)."""
    request_id: str
    conversation_id: int
    turn_index: int
    tenant: str
    num_prompt_tokens: int
    max_output_tokens: int
    arrival_s: float
    start_s: float = 0.0  # sent (later than arrival_s when max_concurrency held it back)
    token_times_s: list[float] = field(default_factory=list)
    error: str = ""
    instance: str = ""  # colocated replica, or prefill instance
    decode_instance: str = ""
    reserved_s: float | None = None  # a decode instance reserved its blocks
    prefill_scheduled_s: float | None = None  # first scheduled on the instance computing its prompt
    kv_arrived_s: float | None = None  # its prompt's KV (and first token) reached the decode instance
    decode_scheduled_s: float | None = None  # first decode step on the decode instance
    num_preemptions: int = 0
    kv_transfer: str = ""  # "transferred" or "recomputed: ..." (decode side)

    @property
    def success(self) -> bool:
        return not self.error and len(self.token_times_s) > 0

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_times_s)

    @property
    def finish_s(self) -> float:
        return self.token_times_s[-1] if self.token_times_s else self.start_s
