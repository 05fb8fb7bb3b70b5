"""Where the ranks of a group run: child processes of rank 0's process (the local launcher), or Ray actors
in the bundles of the instance's placement group (the Ray launcher). Either way rank 0 gets a Popen-like
handle (poll, wait, kill, pid) and a Connection to the rank, which runs
`serving.runner.tensor_parallel._worker_main` on it.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection

from serving.engine.cpu_placement import engine_environment, leave_stop_signals_to_parent

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0

# Ray sets an actor's CUDA_VISIBLE_DEVICES to the GPUs it gave the actor, unless this is set in the
# actor's environment: the Ray launcher sets it for the actor of a prefill or decode instance of several
# ranks on GPUs, whose engine (rank 0) maps every rank's KV cache by CUDA IPC and so must see their GPUs
RAY_NOSET_CUDA = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def own_gpus_first() -> str | None:
    """In a Ray actor, before CUDA starts in its process: under RAY_NOSET_CUDA, CUDA_VISIBLE_DEVICES lists
    the GPUs Ray gave the actor first (cuda:0 is its own, as when Ray sets it) and then the node's others
    (whose memory it can then open by CUDA IPC); otherwise Ray's own setting stays. Returns the value."""
    if os.environ.get(RAY_NOSET_CUDA, "").lower() not in ("1", "true"):
        return os.environ.get("CUDA_VISIBLE_DEVICES")
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        raise RuntimeError("CUDA started in this process before its GPUs were chosen (own_gpus_first)")
    import ray
    own = [str(i) for i in ray.get_gpu_ids()]
    if own:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # the node's, as its raylet was started with
        node = visible.split(",") if visible else [str(i) for i in range(_node_gpus(ray))]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(own + [gpu for gpu in node if gpu not in own])
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def _node_gpus(ray) -> int:
    node_id = ray.get_runtime_context().get_node_id()
    (node,) = [node for node in ray.nodes() if node["NodeID"] == node_id]
    return int(node["Resources"].get("GPU", 0))


def start_local_rank() -> tuple[subprocess.Popen, Connection]:
    """A worker rank as a child process, over a private socket pair whose child end it inherits by fd:
    nothing on its command line but the fd number, and no __main__ re-import (a user's unguarded
    script stays one process)."""
    ours, theirs = socket.socketpair()
    try:
        process = subprocess.Popen([sys.executable, "-m", "serving.runner.rank_hosts", str(theirs.fileno())],
                                   pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                   env=engine_environment())  # OpenMP waits passively, as the engine's
    finally:
        theirs.close()
    return process, Connection(ours.detach())


class RankHost:
    """A worker rank in a Ray actor (wrapped with ray.remote by RayRanks): it connects back to rank 0
    and serves until rank 0 goes away. Its GPU, on CUDA, is its first visible one (own_gpus_first)."""

    def __init__(self) -> None:
        self._visible = own_gpus_first()

    def describe(self) -> tuple[int, str | None]:
        """(pid, CUDA_VISIBLE_DEVICES)."""
        return os.getpid(), self._visible

    def run(self, address: tuple[str, int], authkey: bytes) -> None:
        from multiprocessing.connection import Client
        from serving.runner.tensor_parallel import _worker_main
        _worker_main(Client(address, authkey=authkey), gpu_index=0)


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

    def actor(self, rank: int):
        """Rank `rank`'s RankHost actor, in its bundle."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        bundle = self._bundles[rank]
        return self._ray.remote(RankHost).options(
            num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=rank),
            runtime_env={"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}},
            name=None).remote()

    def start(self, rank: int) -> tuple[RayRank, Connection]:
        import secrets
        import threading
        from multiprocessing.connection import Listener
        ray = self._ray
        actor = self.actor(rank)
        pid, visible = ray.get(actor.describe.remote(), timeout=STARTUP_TIMEOUT_S)
        if visible is not None:
            logger.info("tensor-parallel rank %d: Ray actor pid %d, CUDA_VISIBLE_DEVICES=%s", rank, pid, visible)
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


def main() -> int:
    """`python -m serving.runner.rank_hosts FD`: a local worker rank, talking to rank 0 over socket FD (it
    stops when rank 0 closes the connection; stop signals are the server's to act on)."""
    leave_stop_signals_to_parent()
    logging.basicConfig(level=os.environ.get("PDSERVE_LOG_LEVEL", "WARNING"))
    from serving.runner.tensor_parallel import _worker_main
    _worker_main(Connection(int(sys.argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
