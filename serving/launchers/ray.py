"""The Ray launcher: each instance is a Ray actor holding its resources (num_cpus, num_gpus).

The actor's process *is* the instance process: the actor runs `serve_instance` on a thread of its
own and answers `info()` with the addresses once serving. Ray restarts an actor whose process dies
(max_restarts), which starts the instance again; the router then asks the restarted actor for its new
addresses. With `same_node`, prefill-i and decode-i share a STRICT_PACK placement group (one node).

Without --ray-address a local Ray cluster is started (sized to fit the deployment) and stopped at
shutdown; with one, the instances join that cluster and only they are removed at shutdown. A process
that has already called ray.init keeps its own connection.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import Future

from serving.config import DeployConfig
from serving.instance._proto import instance_pb2 as pb
from serving.instance.servicer import InstanceAddress, InstanceSpec, serve_instance
from serving.launchers.base import STOP_GRACE_S, LaunchedInstance
from serving.runner.rank_hosts import RAY_NOSET_CUDA, own_gpus_first

logger = logging.getLogger(__name__)

_LOCAL_START_ATTEMPTS = 2  # starts of a local Ray cluster before its error is raised

_MAX_RAY_RESTARTS = 5
_MAX_TASK_RETRIES = 3


class InstanceActor:
    """Hosts one instance in a Ray worker process (wrapped with ray.remote by the launcher)."""

    def __init__(self, spec: InstanceSpec) -> None:
        # before anything starts CUDA here: its engine process inherits the GPUs it sees
        self._visible_gpus = own_gpus_first()
        self._ready: Future = Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, args=(spec,), name="pdserve-instance", daemon=True)
        self._thread.start()

    def _run(self, spec: InstanceSpec) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await serve_instance(spec, self._ready.set_result, self._stop)
        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - reported through info()
            logger.exception("instance %s failed", spec.name)
            if not self._ready.done():
                self._ready.set_exception(RuntimeError(f"instance {spec.name} failed to start: {e}"))

    def info(self, timeout_s: float) -> tuple[str, bytes]:
        ready: InstanceAddress = self._ready.result(timeout=timeout_s)
        return ready.address, ready.info.SerializeToString()

    def pid(self) -> int:
        return os.getpid()

    def visible_gpus(self) -> str | None:
        """CUDA_VISIBLE_DEVICES of its process (and its engine's)."""
        return self._visible_gpus

    def stop(self, timeout_s: float) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)


class RayLauncher:
    def __init__(self, deploy: DeployConfig, stop_budget_s: float = STOP_GRACE_S) -> None:
        import ray  # only this launcher needs Ray
        self._ray = ray
        self.deploy = deploy
        self.stop_budget_s = stop_budget_s  # how long a stopped instance may take (base.py: stop_budget_s)
        self._connected_here = False  # ray.init was ours: ray.shutdown at the end (stops a local cluster)
        self._actors: dict[str, object] = {}
        self._addresses: dict[str, str] = {}
        self._placement_groups: list = []

    def start(self, specs: list[InstanceSpec]) -> list[LaunchedInstance]:
        try:
            self._connect(sum(spec.config.parallel.world_size for spec in specs))
            strategies = self._placement(specs)
            specs = [self._with_rank_group(spec, strategies) for spec in specs]
            for spec in specs:
                self._actors[spec.name] = self._make_actor(spec, strategies.get(spec.name))
            return [self._launched(spec, self.deploy.instance_start_timeout_s) for spec in specs]
        except BaseException:
            self.shutdown()
            raise

    def _connect(self, num_instances: int) -> None:
        """num_instances: what the deployment needs room for, in instances of num_cpus_per_instance (one
        per tensor-parallel rank)."""
        ray = self._ray
        if ray.is_initialized():
            return
        if self.deploy.ray_address:
            ray.init(address=self.deploy.ray_address, log_to_driver=True)
        else:
            # a local cluster with room for every instance (Ray's CPUs are a logical count)
            num_cpus = max(os.cpu_count() or 1, int(-(-num_instances * self.deploy.num_cpus_per_instance // 1)))
            for attempt in range(1, _LOCAL_START_ATTEMPTS + 1):
                try:
                    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
                    break
                except RuntimeError as e:
                    # the head's GCS server did not publish its port in time (Ray waits 30 s): seen once on a
                    # loaded 2-core box with no GCS log at all; a second start is cheap next to failing
                    if attempt == _LOCAL_START_ATTEMPTS or "Timed out" not in str(e):
                        raise
                    logger.warning("the local Ray cluster did not start (%s); starting it again", e)
                    ray.shutdown()
        self._connected_here = True

    def _bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.deploy.num_cpus_per_instance}
        if self.deploy.num_gpus_per_instance:
            bundle["GPU"] = self.deploy.num_gpus_per_instance
        return bundle

    def _placement(self, specs: list[InstanceSpec]) -> dict[str, object]:
        """prefill-i and decode-i on one node (a STRICT_PACK group) for each pair, when asked."""
        if not self.deploy.same_node:
            return {}
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        prefill = [s for s in specs if s.role == "prefill"]
        decode = [s for s in specs if s.role == "decode"]
        strategies = {}
        for pair in zip(prefill, decode):
            if any(spec.config.parallel.world_size > 1 for spec in pair):
                # its ranks have a group of their own (_with_rank_group); the pair is not kept together
                logger.warning("same_node: %s and %s are not placed on one node (tensor-parallel instances get "
                               "a placement group of their own ranks)", pair[0].name, pair[1].name)
                continue
            group = placement_group([self._bundle(), self._bundle()], strategy="STRICT_PACK")
            self._placement_groups.append(group)
            self._ray.get(group.ready(), timeout=self.deploy.instance_start_timeout_s)
            for index, spec in enumerate(pair):
                strategies[spec.name] = PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=index)
        return strategies

    def _with_rank_group(self, spec: InstanceSpec, strategies: dict) -> InstanceSpec:
        """An instance of more than one tensor-parallel rank gets a placement group of one bundle per rank
        on one node (STRICT_PACK: its ranks share loopback, /dev/shm and NVLink): its own actor, rank 0,
        in bundle 0; its engine starts ranks 1.. as actors in the others (serving/runner/
        tensor_parallel.py), found by the group's name."""
        tp = spec.config.parallel.world_size  # ranks: every TP rank of every pipeline stage
        if tp == 1:
            return spec
        import dataclasses
        import secrets
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        name = f"pdserve-{spec.name}-{secrets.token_hex(4)}"
        group = placement_group([self._bundle()] * tp, strategy="STRICT_PACK", name=name)
        self._placement_groups.append(group)
        try:
            self._ray.get(group.ready(), timeout=self.deploy.instance_start_timeout_s)
        except self._ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"instance {spec.name}: no Ray node has room for its {tp} tensor-parallel ranks "
                               f"({self._bundle()} each) within {self.deploy.instance_start_timeout_s:.0f}s") from None
        strategies[spec.name] = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
        namespace = self._ray.get_runtime_context().namespace
        return dataclasses.replace(spec, config=spec.config.replace(ray_placement_group=name, ray_namespace=namespace))

    def _make_actor(self, spec: InstanceSpec, strategy):
        # the spec (config without the API key, and the deployment's token) goes as a constructor
        # argument, on no command line
        return self._ray.remote(InstanceActor).options(**self.actor_options(spec, strategy)).remote(spec)

    def actor_options(self, spec: InstanceSpec, strategy) -> dict:
        """Ray options of an instance's actor. The actor of a prefill or decode instance of several ranks
        on GPUs sees every GPU of its node, its own first (rank_hosts.own_gpus_first): its engine, rank 0,
        maps each rank's KV cache by CUDA IPC, on the rank's GPU."""
        options = {"num_cpus": self.deploy.num_cpus_per_instance, "num_gpus": self.deploy.num_gpus_per_instance,
                   "max_restarts": _MAX_RAY_RESTARTS if self.deploy.restart_failed_instances else 0,
                   "max_task_retries": _MAX_TASK_RETRIES}
        if strategy is not None:
            options["scheduling_strategy"] = strategy
        if (spec.role in ("prefill", "decode") and spec.config.parallel.world_size > 1
                and self.deploy.num_gpus_per_instance):
            options["runtime_env"] = {"env_vars": {RAY_NOSET_CUDA: "1"}}
        return options

    def _launched(self, spec: InstanceSpec, timeout_s: float) -> LaunchedInstance:
        ref = self._actors[spec.name].info.remote(timeout_s)
        try:
            address, info = self._ray.get(ref, timeout=timeout_s + 5.0)
        except self._ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"instance {spec.name} did not start within {timeout_s:.0f}s (does the Ray "
                               f"cluster have {self.deploy.num_cpus_per_instance} free CPUs for it?)") from None
        self._addresses[spec.name] = address
        return LaunchedInstance(spec, address, pb.InstanceInfo.FromString(info))

    async def restart(self, spec: InstanceSpec) -> LaunchedInstance:
        """Ray restarts a dead actor by itself; an actor whose instance is alive at the old address
        (hung, unreachable) is killed first so that Ray restarts it."""
        loop = asyncio.get_running_loop()
        old_address = self._addresses.get(spec.name)
        launched = await loop.run_in_executor(None, self._launched, spec, self.deploy.instance_start_timeout_s)
        if launched.address != old_address:
            return launched
        self._ray.kill(self._actors[spec.name], no_restart=False)
        return await loop.run_in_executor(None, self._launched, spec, self.deploy.instance_start_timeout_s)

    def pid(self, name: str) -> int:
        return self._ray.get(self._actors[name].pid.remote(), timeout=30)

    def visible_gpus(self, name: str) -> str | None:
        """CUDA_VISIBLE_DEVICES of an instance's actor (None: not set)."""
        return self._ray.get(self._actors[name].visible_gpus.remote(), timeout=30)

    def shutdown(self) -> None:
        ray = self._ray
        if not ray.is_initialized():
            return
        actors, self._actors = list(self._actors.values()), {}
        stops = [actor.stop.remote(self.stop_budget_s) for actor in actors]
        try:
            ray.wait(stops, num_returns=len(stops), timeout=self.stop_budget_s + 5.0)
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            from ray.util.placement_group import remove_placement_group
            for group in self._placement_groups:
                remove_placement_group(group)
            self._placement_groups = []
            if self._connected_here:  # stops the cluster if ray.init started it, else disconnects
                ray.shutdown()
                self._connected_here = False
