"""Where the ranks of a group run: child processes of rank 0's process (the local launcher), or Ray actors
in the bundles of the instance's placement group (the Ray launcher). Either way rank 0 gets a Popen-like
handle (poll, wait, kill, pid) and a Connection to the rank, which runs
`serving.runner.tensor_parallel._worker_main` on it.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection

from serving.engine.cpu_placement import engine_environment

STARTUP_TIMEOUT_S = 600.0


def start_local_rank() -> tuple[subprocess.Popen, Connection]:
    """A worker rank as a child process, over a private socket pair whose child end it inherits by fd:
    nothing on its command line but the fd number, and no __main__ re-import (a user's unguarded
    script stays one process)."""
    ours, theirs = socket.socketpair()
    try:
        process = subprocess.Popen([sys.executable, "-m", "serving.runner.tensor_parallel", str(theirs.fileno())],
                                   pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                   env=engine_environment())  # OpenMP waits passively, as the engine's
    finally:
        theirs.close()
    return process, Connection(ours.detach())


class RankHost:
    """A worker rank in a Ray actor (wrapped with ray.remote by RayRanks): it connects back to rank 0
    and serves until rank 0 goes away."""

    def pid(self) -> int:
        return os.getpid()

    def run(self, address: tuple[str, int], authkey: bytes) -> None:
        from multiprocessing.connection import Client
        from serving.runner.tensor_parallel import _worker_main
        _worker_main(Client(address, authkey=authkey))


class RayRank:
    """A Ray rank actor seen through the calls TensorParallelWorkers makes on a Popen."""

    def __init__(self, ray, actor, pid: int, done_ref) -> None:
        self._ray, self._actor, self.pid, self._done = ray, actor, pid, done_ref
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            ready, _ = self._ray.wait([self._done], timeout=0)
            if ready:
                try:
                    self._ray.get(self._done)
                    self.returncode = 0
                except Exception:  # noqa: BLE001 - the actor died or its run raised
                    self.returncode = -1
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        ready, _ = self._ray.wait([self._done], timeout=timeout)
        if not ready:
            raise subprocess.TimeoutExpired("ray rank actor", timeout)
        return self.poll()

    def kill(self) -> None:
        self._ray.kill(self._actor, no_restart=True)


class RayRanks:
    """Ranks 1.. as Ray actors in bundles 1.. of the instance's placement group (the Ray launcher made it,
    STRICT_PACK: one node, so the ranks share loopback and /dev/shm with rank 0). Each actor connects back
    to a listener of rank 0's on loopback with a one-time key, sent as a call argument; the actors belong
    to this process's Ray job and go with it."""

    def __init__(self, placement_group: str, namespace: str | None) -> None:
        import ray
        from ray.util import get_placement_group
        if not ray.is_initialized():  # an engine process under a Ray actor: join the actor's cluster
            ray.init(address="auto", namespace=namespace, log_to_driver=False)
        self._ray = ray
        self._group = get_placement_group(placement_group)
        self._bundles = self._group.bundle_specs

    def start(self, rank: int) -> tuple[RayRank, Connection]:
        import secrets
        import threading
        from multiprocessing.connection import Listener
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        ray = self._ray
        bundle = self._bundles[rank]
        actor = ray.remote(RankHost).options(
            num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=rank),
            runtime_env={"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}},
            name=None).remote()
        pid = ray.get(actor.pid.remote(), timeout=STARTUP_TIMEOUT_S)
        authkey = secrets.token_bytes(32)
        with Listener(("127.0.0.1", 0), authkey=authkey) as listener:
            accepted: list[Connection] = []
            thread = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
            thread.start()
            done = actor.run.remote(listener.address, authkey)
            handle = RayRank(ray, actor, pid, done)
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while thread.is_alive():
                thread.join(0.2)
                if handle.poll() is not None or time.monotonic() > deadline:
                    handle.kill()
                    raise RuntimeError(f"tensor-parallel rank {rank} (Ray actor, pid {pid}) did not connect back")
        return handle, accepted[0]
