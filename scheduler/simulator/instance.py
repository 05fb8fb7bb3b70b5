"""One simulated instance: the runtime's own parts (Scheduler with its KV manager, block pool and
policies, the connector policy of its role, EngineCore) driven by the latency-model executor on a
virtual clock of its own, plus what the router knows of it (the `InstanceView` routing reads).

The instance's clock is set to the global event time at the start of each of its steps and advanced
by the step's modelled duration; between steps the instance sleeps until an event concerns it.
"""
from __future__ import annotations

from kvcache.block_pool import BlockPool
from kvcache.host_tier import HostTier
from kvcache.kv_manager import KVCacheManager
from scheduler.clock import VirtualClock
from scheduler.connectors import ConnectorPolicy, NullConnector, RemoteDecode, RemotePrefill
from scheduler.engine_core import EngineCore
from scheduler.policies import make_preemption
from scheduler.latency_executor import LatencyModelExecutor
from scheduler.scheduler import Scheduler
from scheduler.simulator.spec import SimDeployment, SimInstanceSpec
from scheduler.simulator.transfer import TransferNetwork


def make_connector(spec: SimInstanceSpec, deployment: SimDeployment) -> ConnectorPolicy:
    """The connector policy of the role, configured as build_engine configures it."""
    if spec.role == "decode":
        return RemotePrefill(deployment.kv_transfer_stall_timeout_s, deployment.kv_transfer_failure_policy)
    if spec.role == "prefill":
        return RemoteDecode(deployment.kv_transfer_lease_ttl_s, spec.num_layers, deployment.links.layers_per_group)
    return NullConnector()


class SimInstance:
    def __init__(self, spec: SimInstanceSpec, deployment: SimDeployment, network: TransferNetwork,
                 token_id: int = 0) -> None:
        self.spec = spec
        self.name = spec.name
        self.role = spec.role
        self.clock = VirtualClock()
        kv = KVCacheManager(BlockPool(spec.num_blocks, spec.enable_prefix_caching), spec.block_size)
        host = (HostTier(max(spec.num_host_blocks, 1), spec.block_size, spec.enable_prefix_caching)
                if spec.scheduler.preemption_mode == "swap" else None)
        self.scheduler = Scheduler(spec.scheduler, kv, spec.max_model_len, make_connector(spec, deployment),
                                   self.clock, preemption=make_preemption(spec.scheduler.preemption_mode, host))
        self.moves = network.register(spec)
        self.executor = LatencyModelExecutor(spec.latency, token_id, self.moves, self.clock, pipeline_depth=spec.pp,
                                             swap_block_bytes=spec.swap_block_bytes,
                                             num_layers=-(-spec.num_layers // spec.pp))
        self.core = EngineCore(self.scheduler, self.executor, self.clock)
        # the router's view (what the runtime's InstanceState tracks)
        self.num_queued_prefill_tokens = 0  # prompt tokens sent here, first token not yet back
        self.num_active = 0  # requests reserved or streaming here
        self.num_blocks_reserved_since_poll = 0
        self._poll_interval_s = deployment.poll_interval_s
        self._poll_epoch = -1
        self._polled_free_blocks = spec.num_blocks
        # the event loop's bookkeeping
        self.stepping = False  # a step is under way (or due): wake-ups fold into it
        self.poked = False  # something happened to it during that step
        self.max_num_waiting = 0

    # ---- InstanceView ----
    @property
    def accepting(self) -> bool:
        return True

    def num_free_blocks_estimate_at(self, now: float) -> int:
        """Free blocks as of the router's last poll (every poll_interval_s), minus what it reserved
        here since: polls happen lazily, when the router looks in a new poll interval."""
        epoch = int(now / self._poll_interval_s) if self._poll_interval_s > 0 else -2
        if epoch != self._poll_epoch:
            self._poll_epoch = epoch
            self._polled_free_blocks = self.scheduler.kv.pool.num_free_blocks
            self.num_blocks_reserved_since_poll = 0
        return self._polled_free_blocks - self.num_blocks_reserved_since_poll

    @property
    def num_free_blocks_estimate(self) -> int:
        return self._polled_free_blocks - self.num_blocks_reserved_since_poll

    # ---- introspection ----
    @property
    def num_steps(self) -> int:
        return self.core.num_steps

    @property
    def busy_seconds(self) -> float:
        return self.executor.busy_seconds

    def check_integrity(self) -> None:
        self.core.check_integrity()
