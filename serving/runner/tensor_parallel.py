"""The executor of a group of ranks (tensor-parallel ranks times pipeline stages): one model runner per
rank, every rank executing the same plan.

    engine (rank 0's process)                         rank 1 .. tp-1 (spawned processes)
    scheduler -> plan -> TensorParallelRunner.execute  -- plan over a pipe -->  ModelRunner.execute
                         ModelRunner.execute (rank 0)  <-- gloo / NCCL collectives inside the forward -->
                         <-- an acknowledgement (or the rank's error) per step --
    StepResult of rank 0

Every rank holds its shard of the weights (serving/models/tensor_parallel.py) and its slice of the KV
cache (the same block ids on every rank: one scheduler, one block table), runs the same forward, gets
the same gathered logits and samples the same tokens with the same seeds, as vLLM's workers do; rank
0's result is the step's. The ranks' process group is made from a TCPStore on loopback owned by rank
0, without torch.distributed's global default group, so the process that hosts rank 0 (the engine
process, or a user's process running the offline LLM) keeps its own.

A rank that dies makes its peers' next collective fail at once (a hung rank after
parallel.collective_timeout_s); a step that fails on any rank, for any reason, leaves the ranks at
different collectives. Either way the step raises ExecutorDeadError, which ends the engine loop rather
than failing one step's requests and carrying on (vLLM's engine dies the same way on a worker's error):
the engine process is restarted, or the instance replaced, as for any dead engine. Workers exit when
rank 0's process goes away (end of file on their connection). On CPU the float32 collectives go
through shared memory (pdkernels/csrc/cpu_shm_collectives.cpp) rather than gloo where they fit a slot.

With pipeline stages (serving/models/pipeline.py), rank r is stage r // tp and TP rank r % tp; each
stage's ranks form a TP group of their own, and the hidden state goes stage to stage over the world
group (serving/runner/stage_pipe.py). Rank 0 is stage 0: `submit` runs its part and returns, so up to
pp plans are in flight (scheduler/engine_core.py), and the last stage's first rank sends the step's
result back. In a prefill or decode instance, ranks 1..'s KV caches are shared-memory files rank 0
maps (on GPUs, their own allocations opened by CUDA IPC: serving/runner/rank_memory.py): the instance's
KV transfer endpoint is rank 0, for every rank's heads and layers (kvcache/transfer/plans.py).
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from scheduler.errors import ExecutorDeadError
from scheduler.kv_moves import SendKV
from scheduler.step import StepPlan, StepResult
from serving.kv_connector.swap import rank_swap_worker
from serving.models import load_model
from serving.models.tensor_parallel import CollectiveError, ShmCollectives, TPGroup, make_process_group
from serving.runner.model_runner import ModelRunner, model_kv_layout
from serving.runner.rank_hosts import STARTUP_TIMEOUT_S, RayRank, RayRanks, start_local_rank
from serving.runner.rank_memory import (CUDA_IPC_CACHES, SharedRankCaches, attach_collectives_region,
                                        create_collectives_region, open_rank_cache, rank_cache)

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT = datetime.timedelta(seconds=STARTUP_TIMEOUT_S)
STEP_ANSWER_TIMEOUTS = 4  # a worker's step answer may take this many collective timeouts (a long prefill)


@dataclass(frozen=True)
class RankSpec:
    """What a worker rank needs to build its runner (sent to the spawned process)."""
    model_dir: str
    dtype: str  # torch dtype name, e.g. "float32"
    device: str
    rank: int
    size: int
    store_port: int
    seed: int
    threads: int
    collective_timeout_s: float
    shm_name: str | None = None  # the shared-memory collectives region of its TP group (CPU), or None: gloo only
    shm_slot_bytes: int = 0
    enforce_eager: bool = False  # as rank 0: every rank takes the same path through a step
    tp_size: int = 0             # ranks per pipeline stage (0: size, no pipeline)
    pp_size: int = 1             # pipeline stages; rank r is stage r // tp_size, TP rank r % tp_size
    pp_partition: tuple[int, ...] = ()  # the stages' layers (kvcache/layout.py)


def _join(store, rank: int, size: int, tp: int, pp: int, device: torch.device, timeout_s: float,
          shm: ShmCollectives | None):
    """(this rank's TPGroup or None, the world process group for stage-to-stage sends or None): with one
    stage the TP group is the world; with several, each stage's ranks make a TP group of their own."""
    if pp == 1:
        return TPGroup(rank, size, make_process_group(store, rank, size, device, timeout_s), shm), None
    from torch.distributed import PrefixStore
    world = make_process_group(store, rank, size, device, timeout_s)
    stage, tp_rank = divmod(rank, tp)
    group = None
    if tp > 1:
        group = TPGroup(tp_rank, tp, make_process_group(PrefixStore(f"stage{stage}", store), tp_rank, tp, device,
                                                        timeout_s), shm)
    return group, world


def _stage_of(model_dir: str, rank: int, tp: int, pp: int, partition: tuple[int, ...] = ()):
    """Rank `rank`'s pipeline stage (None: no pipeline); partition (): the even split."""
    if pp == 1:
        return None
    from serving.models.config import ModelArchConfig
    from serving.models.pipeline import PipelineStage, layer_partition
    if not partition:
        partition = layer_partition(ModelArchConfig.from_model_dir(model_dir).num_layers, pp)
    if len(partition) != pp:
        raise ValueError(f"a layer partition of {len(partition)} stages for pipeline_parallel_size {pp}")
    return PipelineStage.of(partition, rank // tp)


def _stage_pipe(model, world, rank: int, tp: int, device: torch.device):
    stage = getattr(model, "pipeline_stage", None)
    if stage is None:
        return None
    from serving.runner.stage_pipe import StagePipe
    arch = getattr(model, "full_config", model.config)
    return StagePipe(world, None if stage.is_first else rank - tp, None if stage.is_last else rank + tp,
                     arch.hidden_size, next(model.parameters()).dtype, device)


def _first_layer(model) -> int:
    stage = getattr(model, "pipeline_stage", None)
    return stage.first_layer if stage is not None else 0


def _worker_main(conn, gpu_index: int | None = None) -> None:
    """A worker rank (on CUDA, its GPU is gpu_index, else its rank's): read its spec, say it started, join
    the group, load the shard, then wait for the KV cache size and execute every plan it is sent until
    the connection closes. Each plan is answered with (result, busy seconds, held seconds): the result
    is the StepResult on the last pipeline stage's first rank (which samples for the group), else None;
    busy its forward passes; held the whole step less the wait for the stage before's activations (how
    long the plan kept this rank); or with the error's text, after which the rank stops."""
    from torch.distributed import TCPStore
    try:
        spec: RankSpec = conn.recv()
        torch.set_num_threads(spec.threads)
        store = TCPStore("127.0.0.1", spec.store_port, spec.size, False, timeout=STARTUP_TIMEOUT)
        conn.send(("started", os.getpid()))
        device = torch.device(spec.device)
        if device.type == "cuda":  # a local rank sees every GPU (its own is its rank's); a Ray rank its own first
            index = spec.rank if gpu_index is None else gpu_index
            torch.cuda.set_device(index)
            device = torch.device("cuda", index)
        tp, pp = spec.tp_size or spec.size, spec.pp_size
        shm = (attach_collectives_region(spec.shm_name, spec.rank % tp, tp, spec.shm_slot_bytes,
                                         spec.collective_timeout_s) if spec.shm_name else None)
        group, world = _join(store, spec.rank, spec.size, tp, pp, device, spec.collective_timeout_s, shm)
        model = load_model(spec.model_dir, getattr(torch, spec.dtype), device, group,
                           _stage_of(spec.model_dir, spec.rank, tp, pp, spec.pp_partition))
        sizes = conn.recv()
        if sizes is None:  # rank 0 gave up before the group was ready (its error is its own to report)
            return
        num_blocks, block_size, cache_name, num_host_blocks = sizes
        layout = model_kv_layout(model, block_size)
        kv_cache, exported = rank_cache(cache_name, layout, num_blocks, device)
        runner = ModelRunner(model, kv_cache, layout, device, spec.seed, enforce_eager=spec.enforce_eager,
                             pipe=_stage_pipe(model, world, spec.rank, tp, device),
                             connector=rank_swap_worker(kv_cache, num_host_blocks, _first_layer(model))
                             if num_host_blocks else None)
        reports_result = pp > 1 and runner.stage.is_last and spec.rank % tp == 0
        conn.send(("ready", (os.getpid(), exported)))
    except (EOFError, OSError):  # rank 0's process is gone
        return
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    while True:
        try:
            plan = conn.recv()
        except (EOFError, OSError):  # rank 0's process is gone
            return
        if plan is None:
            return
        busy, waited, started = runner.forward_seconds, runner.pipe_wait_seconds, time.perf_counter()
        try:
            result = runner.execute(plan)
            if exported is not None:  # rank 0 sends this step's KV from the cache once answered: it is written
                torch.cuda.synchronize(device)
        except BaseException as e:  # noqa: BLE001 - the group is out of step now: report and stop
            conn.send(f"{type(e).__name__}: {e}")
            return
        held = time.perf_counter() - started - (runner.pipe_wait_seconds - waited)
        conn.send((result if reports_result else None, runner.forward_seconds - busy, held))


class TensorParallelWorkers:
    """Ranks 1 .. size-1 of a group of tp ranks per pipeline stage and pp stages (child processes, or
    Ray actors in the instance's placement group); rank 0 is the caller's process (stage 0's first
    rank). Rank r is stage r // tp, TP rank r % tp. Constructing it starts them and joins the group; the
    caller then loads its own shard with `group` and `stage`, sizes the cache and calls
    `ready(num_blocks, block_size)`."""

    def __init__(self, model_dir: str, dtype: torch.dtype, device: torch.device, size: int, seed: int,
                 collective_timeout_s: float, ray_placement_group: str | None = None,
                 ray_namespace: str | None = None, enforce_eager: bool = False, pp: int = 1,
                 pp_partition: tuple[int, ...] = ()) -> None:
        from torch.distributed import TCPStore
        self.tp, self.pp = size, pp
        self.size, self.enforce_eager, self.device = size * pp, enforce_eager, device
        # how long rank 0 waits for a worker's answer to a step before the group is declared hung: a hung
        # TP rank is caught sooner, by a collective's timeout; a hung last pipeline stage only by this
        self.answer_timeout_s = STEP_ANSWER_TIMEOUTS * collective_timeout_s
        world = self.size
        self._threads_before = torch.get_num_threads()
        threads = max(1, self._threads_before // world)
        torch.set_num_threads(threads)  # this process is rank 0: its share of the cores (restored at close)
        store = TCPStore("127.0.0.1", 0, world, True, timeout=STARTUP_TIMEOUT, wait_for_workers=False)
        self._store = store  # rank 0 owns it: it must outlive the group
        self.processes: list = []  # subprocess.Popen, or RayRank (the same calls): serving/runner/rank_hosts.py
        self.conns: list[Connection] = []
        # one shared-memory collectives region per stage's TP group (rank 0 owns them all)
        regions = [create_collectives_region(device, size, collective_timeout_s) if size > 1 else (None, None) for _ in range(pp)]
        self._shm_files = [shared for shared, _ in regions if shared is not None]
        shm = regions[0][1]
        self._shared_caches: SharedRankCaches | None = None
        self.rank_caches: list[torch.Tensor] = []  # ranks 1..'s KV caches, when ready() shared them
        self.stage = _stage_of(model_dir, 0, size, pp, pp_partition)  # rank 0's pipeline stage (None: no pipeline)
        partition = self.stage.partition if self.stage is not None else ()
        ray_ranks = RayRanks(ray_placement_group, ray_namespace) if ray_placement_group else None
        try:
            for rank in range(1, world):
                process, conn = ray_ranks.start(rank) if ray_ranks else start_local_rank()
                self.processes.append(process)
                self.conns.append(conn)
                shared, collectives = regions[rank // size]
                conn.send(RankSpec(model_dir, str(dtype).removeprefix("torch."), device.type, rank, world, store.port,
                                   seed, threads, collective_timeout_s, shared.name if collectives else None,
                                   collectives.slot_bytes if collectives else 0, enforce_eager, size, pp,
                                   partition))
            for rank in range(1, world):
                self._expect(rank, "started")
            self.group, self.world_group = _join(store, 0, world, size, pp, device, collective_timeout_s, shm)
        except BaseException:
            self.close()
            raise

    def _expect(self, rank: int, what: str):
        """What rank's `what` message carries, once it comes (the rank watched meanwhile), or its error."""
        conn, process = self.conns[rank - 1], self.processes[rank - 1]
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not conn.poll(0.5):
            if process.poll() is not None:
                raise RuntimeError(f"tensor-parallel rank {rank} exited with code {process.returncode} before it "
                                   f"{what} (its log is above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel rank {rank} has not {what} after {STARTUP_TIMEOUT_S:.0f} s")
        try:
            status, detail = conn.recv()
        except (EOFError, OSError) as e:
            raise RuntimeError(f"tensor-parallel rank {rank} closed its connection before it {what}") from e
        if status != what:
            raise RuntimeError(f"tensor-parallel rank {rank} failed to start: {detail}")
        return detail

    def ready(self, num_blocks: int, block_size: int, share_caches_of=None, num_host_blocks: int = 0) -> None:
        """Send every worker the KV cache size; wait until each has built its runner (or raise its error).
        share_caches_of: rank 0's KVCacheLayout, to map the workers' caches in this process too
        (`rank_caches`), for an instance that moves KV: shared-memory files, or on CUDA each rank's
        allocation opened by CUDA IPC.
        num_host_blocks: the host tier each rank swaps its heads to (--preemption-mode swap), else 0."""
        try:
            layouts = [self._rank_layout(share_caches_of, r) for r in range(1, self.size)] if share_caches_of else []
            ipc = bool(layouts) and self.device.type == "cuda"
            names = [CUDA_IPC_CACHES if ipc else None] * len(self.conns)
            if layouts and not ipc:
                self._shared_caches = SharedRankCaches(layouts, num_blocks)
                self.rank_caches = self._shared_caches.tensors
                names = self._shared_caches.names
            for conn, name in zip(self.conns, names):
                conn.send((num_blocks, block_size, name, num_host_blocks))
            handles = [self._expect(rank, "ready")[1] for rank in range(1, self.size)]
            if ipc:
                self.rank_caches = [open_rank_cache(rank, handle, layout, num_blocks)
                                    for rank, (handle, layout) in enumerate(zip(handles, layouts), start=1)]
        except BaseException:
            self.close()
            raise

    def _rank_layout(self, layout, rank: int):
        """Rank `rank`'s KVCacheLayout, from rank 0's: its TP rank's heads, its stage's layers."""
        layout = layout.for_rank(rank % self.tp)
        return layout if self.stage is None else layout.stage_slice(self.stage.partition, rank // self.tp)

    def send(self, plan: StepPlan, earlier_stages_plan: StepPlan | None = None) -> None:
        """The plan to every worker; earlier_stages_plan (the same plan with the tokens the last stage
        sampled since) to the ranks of every pipeline stage but the last."""
        for rank, conn in enumerate(self.conns, start=1):
            own = earlier_stages_plan if earlier_stages_plan is not None and rank // self.tp < self.pp - 1 else plan
            try:
                conn.send(own)
            except (BrokenPipeError, OSError) as e:
                raise ExecutorDeadError(self._death(rank, e)) from e

    def collect(self) -> tuple[StepResult | None, list[float], list[float]]:
        """Each worker's answer to the oldest step it was sent: (the step's result from the last pipeline
        stage's first rank, or None without a pipeline; every worker's busy seconds, and its held
        seconds, rank order). ExecutorDeadError for a worker that failed or died."""
        result, busy, held = None, [], []
        for rank, conn in enumerate(self.conns, start=1):
            try:
                self._wait_answer(rank, conn)
                answer = conn.recv()
            except (EOFError, OSError) as e:
                raise ExecutorDeadError(self._death(rank, e)) from e
            if isinstance(answer, str):
                raise ExecutorDeadError(f"tensor-parallel rank {rank} failed a step ({answer}); the group is out "
                                        "of step and the engine must restart")
            rank_result, seconds, rank_held = answer
            result = rank_result if rank_result is not None else result
            busy.append(seconds)
            held.append(rank_held)
        return result, busy, held

    def _wait_answer(self, rank: int, conn: Connection) -> None:
        if conn.poll(0.05):
            return
        deadline = time.monotonic() + self.answer_timeout_s
        while not conn.poll(0.5):
            if self.processes[rank - 1].poll() is not None:
                return  # recv() sees the closed connection and names the death
            if time.monotonic() > deadline:
                raise ExecutorDeadError(f"rank {rank} (pid {self.processes[rank - 1].pid}) has not answered a step "
                                        f"within {self.answer_timeout_s:g} s ({STEP_ANSWER_TIMEOUTS} x "
                                        "parallel.collective_timeout_s): hung; the engine must restart with a "
                                        "whole group")

    def check_alive(self, grace_s: float = 0.0) -> None:
        """ExecutorDeadError naming a worker that has exited, waiting up to grace_s for one to (a
        collective sees a killed peer's closed socket a moment before its exit can be reaped)."""
        deadline = time.monotonic() + grace_s
        while True:
            for rank, process in enumerate(self.processes, start=1):
                if process.poll() is not None:
                    raise ExecutorDeadError(self._death(rank, None))
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def _death(self, rank: int, error: BaseException | None) -> str:
        process = self.processes[rank - 1]
        try:
            process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        how = f"exit code {process.returncode}" if process.returncode is not None else f"{type(error).__name__}"
        return (f"tensor-parallel rank {rank} (pid {process.pid}) died ({how}); the engine must restart with "
                "a whole group")

    def kill(self) -> None:
        """Kill every worker at once (the group is dead: a hung one would never read the goodbye)."""
        for process in self.processes:
            try:
                process.kill()
            except OSError:
                pass

    def close(self) -> None:
        self.rank_caches = []  # our CUDA IPC mappings first: an exporting rank waits for them as it exits
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            conn.close()
        for process in self.processes:
            try:
                process.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5.0)
            if isinstance(process, RayRank):
                process.kill()  # an idle rank actor would hold its bundle from the next group
        self.conns, self.processes = [], []
        for shared in self._shm_files:
            shared.close()  # the name goes; the ranks' mappings stay valid until they exit
        if self._shared_caches is not None:
            self._shared_caches.close()
        torch.set_num_threads(self._threads_before)


class TensorParallelRunner(ModelRunner):
    """Rank 0's model runner, which also drives the other ranks: every plan goes to each worker before
    rank 0 runs it, and the step ends when every rank has acknowledged it.

    With pipeline stages, rank 0 is stage 0: `submit` sends a plan, runs stage 0's layers and hands the
    hidden state on, then returns, so the engine can schedule and submit the next plan while later
    stages still work on this one (up to `pipeline_depth` plans in flight, vLLM's batch queue);
    `collect` waits for the oldest plan's result, which the last stage's first rank samples and sends.
    Stages before the last do not sample: the tokens the last one sampled reach them with the next plan
    that holds their request."""

    def __init__(self, workers: TensorParallelWorkers, model, *args, **kwargs) -> None:
        pipe = _stage_pipe(model, workers.world_group, 0, workers.tp, next(model.parameters()).device)
        super().__init__(model, *args, pipe=pipe, **kwargs)
        self.workers = workers
        self.sync_before_layers_done = bool(workers.rank_caches)  # peers' KV is written once rank 0 is past a layer
        if self.enforce_eager != workers.enforce_eager:
            raise ValueError("rank 0 and the other ranks must agree on enforce_eager")
        self._in_flight: collections.deque = collections.deque()  # (plan, rank 0's result, start, its seconds)
        self._sampled: dict[str, list[int]] = {}  # tokens the last stage sampled, not yet sent to earlier stages
        # seconds each stage's first rank spent in forward passes (rank 0's own, then the workers'):
        # against the wall time, the pipeline's bubble
        self.stage_busy_seconds = [0.0] * workers.pp

    @property
    def pipeline_depth(self) -> int:
        """How many plans may be in flight at once (the pipeline's stages)."""
        return self.workers.pp

    def execute(self, plan: StepPlan) -> StepResult:
        self.submit(plan)
        return self.collect()

    def submit(self, plan: StepPlan) -> float:
        """Send the plan to the other ranks and compute rank 0's part of it here (stage 0 of a pipeline):
        returns the seconds that took."""
        started, busy = time.perf_counter(), self.forward_seconds
        try:
            earlier = self._with_sampled_tokens(plan) if self.workers.pp > 1 else None
            self.workers.send(plan, earlier)
            try:
                own = super().execute(earlier or plan)
            except Exception as e:
                # whatever failed, the ranks may now stand at different collectives: the group cannot run
                # another step (a worker that fails a step reports it and exits for the same reason)
                if _is_collective_error(e):
                    self.workers.check_alive(grace_s=2.0)  # a dead peer explains it: say which
                raise ExecutorDeadError(f"tensor-parallel rank 0 failed a step ({type(e).__name__}: {e}); the "
                                        "engine must restart with a whole group") from e
        except ExecutorDeadError:
            self.workers.kill()  # a hung or stopped rank would outlive the group otherwise
            raise
        self.stage_busy_seconds[0] += self.forward_seconds - busy
        own_seconds = time.perf_counter() - started
        self._in_flight.append((plan, own, started, own_seconds))
        return own_seconds

    def collect(self) -> StepResult:
        plan, own, started, own_seconds = self._in_flight.popleft()
        try:
            last, busy, held = self.workers.collect()
        except ExecutorDeadError:
            self.workers.kill()
            raise
        if self.workers.pp == 1:
            return own
        first_ranks = [stage * self.workers.tp - 1 for stage in range(1, self.workers.pp)]  # among the workers
        for stage, rank in enumerate(first_ranks, start=1):
            self.stage_busy_seconds[stage] += busy[rank]
        result = last if last is not None else StepResult()
        result.moves = own.moves
        result.step_seconds = time.perf_counter() - started
        result.stage_seconds = [own_seconds] + [held[rank] for rank in first_ranks]
        # The later stages' KV of this plan is in their caches (mapped here, where KV moves) now. Only the
        # sends this plan began take it: a request's earlier prompt chunk, in an earlier plan, finishes
        # while its last chunk may still be in flight, and its KV is not whole before that one is done.
        sending = [move.request_id for move in plan.kv_moves if isinstance(move, SendKV)]
        if sending:
            self.connector.layers_done(sending, self.stage.end_layer, self.stage.num_model_layers)
        for request_id, token_id in result.sampled_token_ids.items():
            self._sampled.setdefault(request_id, []).append(token_id)
        self.connector.tokens_sampled(result.sampled_token_ids)
        return result

    def _with_sampled_tokens(self, plan: StepPlan) -> StepPlan:
        """The plan for stages before the last: each continuing request also carries the tokens the last
        stage sampled for it since its previous plan (new requests carry all of theirs)."""
        sampled = self._sampled
        for request_id in (*plan.finished_request_ids, *plan.preempted_request_ids,
                           *(new.request_id for new in plan.new_requests)):
            sampled.pop(request_id, None)
        if not sampled or not plan.cached_requests:
            return plan
        cached = [dataclasses.replace(d, new_token_ids=d.new_token_ids + sampled.pop(d.request_id))
                  if d.request_id in sampled else d for d in plan.cached_requests]
        return dataclasses.replace(plan, cached_requests=cached)

    def close(self) -> None:
        self.workers.close()


def _is_collective_error(error: Exception) -> bool:
    text = str(error)
    return isinstance(error, CollectiveError) or isinstance(error, RuntimeError) and any(
        marker in text for marker in ("gloo", "Gloo", "NCCL", "Connection closed", "Timed out", "timed out",
                                      "tensor-parallel peer"))
