"""The host-tier swap worker: carries out `SwapOut` and `SwapIn` moves on a thread of its own.

A swapping preemption policy (scheduler/policies/preemption.py) gives a victim's device blocks back to
the pool as soon as it plans their `SwapOut`, and a resumed request computes in the same step as its
`SwapIn`. What makes that safe is one rule this worker and the model runner keep together:

    a plan's swap copies of layer l end before that plan's forward pass touches layer l.

`start` queues the plan's swaps as one job; the thread copies it layer by layer (every move of the job
for layer 0, then layer 1, ...), publishing how far it got and waking the runner once a layer it waits
for is copied; the runner calls `wait_layers(start, end)` before its forward pass reads or writes those
layers (per layer on the Python path, per layer range before a native decode call). So copies of later
layers overlap the forward pass of earlier ones, and the scheduler never waits for a copy at all. Jobs run in order, so a job's layer l also follows every
earlier job's copies. `wait_layers(0, num_layers)` at the end of a step (the runner's) makes every
swap of the step end in it: its result comes back with the step, and its blocks are settled before the
next plan is made.

Copies go by runs: consecutive device blocks that map to consecutive host blocks are one span per layer
(K and V together), so a request allocated in block groups (kvcache/allocation.py) copies a few spans
per layer instead of one per block. On CUDA the thread copies on a stream of its own into pinned host
memory and synchronizes that stream before publishing a layer.

A copy that raises fails its move (and any later move of the same request in the job); the scheduler
recomputes the request. A job the thread does not finish within `timeout_s` makes `wait_layers` raise:
the step fails with the reason instead of hanging.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass

import torch

from kvcache.transfer.counters import LatencyHistogram
from scheduler.kv_moves import FAILED, FINISHED, KVMove, MoveResult, spans

logger = logging.getLogger(__name__)

SWAP_KINDS = ("swap_out", "swap_in")
_IDLE_WAIT_S = 1.0  # how long the swap thread holds its worker while waiting for a job
_NOBODY = 1 << 30  # no waiter wants a layer of the current job


@dataclass
class _Copy:
    request_id: str
    kind: str
    src: torch.Tensor  # [L, 2, N, block_size, Hkv, D]
    dst: torch.Tensor
    runs: list[tuple[int, int, int]]  # (first source block, first destination block, blocks)

    @classmethod
    def of(cls, move: KVMove, kv_cache: torch.Tensor, host_cache: torch.Tensor) -> _Copy:
        if move.kind == "swap_out":
            src, dst, pairs = kv_cache, host_cache, list(zip(move.block_ids, move.host_block_ids))
        else:
            src, dst, pairs = host_cache, kv_cache, list(zip(move.host_block_ids, move.block_ids))
        if len(move.block_ids) != len(move.host_block_ids):
            raise ValueError(f"{move.kind} of {move.request_id}: {len(move.block_ids)} device blocks for "
                             f"{len(move.host_block_ids)} host blocks")
        return cls(move.request_id, move.kind, src, dst, spans(pairs))

    def run(self, layer: int) -> None:
        src, dst = self.src[layer], self.dst[layer]
        if src.device != dst.device:
            # between a GPU and pinned host memory, K's run and V's run are each contiguous: one
            # cudaMemcpyAsync apiece on the swap stream. A view of both ([2, n, ...]) is strided, and torch
            # copies a strided view across devices through a contiguous temporary, not asynchronously
            for first_src, first_dst, n in self.runs:
                for half in (0, 1):
                    dst[half, first_dst:first_dst + n].copy_(src[half, first_src:first_src + n], non_blocking=True)
            return
        for first_src, first_dst, n in self.runs:
            dst[:, first_dst:first_dst + n].copy_(src[:, first_src:first_src + n], non_blocking=True)


class SwapWorker:
    """SwapOut / SwapIn between `kv_cache` and `host_cache` (same layout, host blocks in the second)."""
    address = ""

    def __init__(self, kv_cache: torch.Tensor, host_cache: torch.Tensor, timeout_s: float = 120.0,
                 first_layer: int = 0) -> None:
        if kv_cache.shape[0] != host_cache.shape[0] or kv_cache.shape[3:] != host_cache.shape[3:] \
                or kv_cache.dtype != host_cache.dtype:
            raise ValueError(f"host KV tier {tuple(host_cache.shape)} {host_cache.dtype} does not match the KV cache "
                             f"{tuple(kv_cache.shape)} {kv_cache.dtype}")
        self.kv_cache, self.host_cache = kv_cache, host_cache
        self.num_layers = kv_cache.shape[0]
        self.first_layer = first_layer  # a pipeline stage's: wait_layers takes the model's layer numbers
        self.block_bytes = kv_cache[0, :, 0].numel() * kv_cache.element_size()  # K and V of one block, one layer
        self.timeout_s = timeout_s
        self._stream = torch.cuda.Stream(kv_cache.device) if kv_cache.is_cuda else None
        self._cond = threading.Condition()
        # (copies, failed moves' results, the compute stream's event at start: CUDA only)
        self._jobs: deque[tuple[list[_Copy], list[MoveResult], object]] = deque()
        self._issued = 0  # jobs queued so far
        self._done = 0  # jobs finished (in order)
        self._layers = 0  # layers finished of job _done + 1
        self._wanted = _NOBODY  # the fewest layers a waiter waits for (of job _done + 1)
        self._results: list[MoveResult] = []
        self._closed = False
        self.counts = {"swap_out": 0, "swap_in": 0}  # moves finished, by kind
        self.blocks = {"swap_out": 0, "swap_in": 0}
        self.copies = {"swap_out": 0, "swap_in": 0}  # span copies (per layer), by kind
        self.num_failed = 0
        self.seconds = LatencyHistogram()  # per job: queued -> last layer copied
        # the thread holds the worker only while it copies or waits (up to a second): an engine dropped
        # without close() lets its worker, and the host tier with it, be collected, and the thread ends
        self._thread = threading.Thread(target=_serve, args=(weakref.ref(self),), name="pdserve-kv-swap",
                                        daemon=True)
        self._thread.start()

    # ---- KVConnectorWorker ----
    def start(self, moves: list[KVMove]) -> None:
        copies, failed = [], []
        for move in moves:
            if move.kind not in SWAP_KINDS:
                continue
            try:
                copies.append(_Copy.of(move, self.kv_cache, self.host_cache))
            except (ValueError, AttributeError) as e:
                failed.append(MoveResult(move.request_id, move.kind, FAILED, str(e)))
        if not copies and not failed:
            return
        # on CUDA the swap stream starts once the compute stream's work so far is done (a swap-out reads
        # blocks that earlier kernels wrote)
        ready = torch.cuda.current_stream(self.kv_cache.device).record_event() if self._stream is not None else None
        with self._cond:
            self._issued += 1
            self._jobs.append((copies, failed, ready))
            self._cond.notify_all()

    def wait_layers(self, layer_start: int, layer_end: int) -> None:
        """Return once every queued job has copied layers [0, layer_end) (earlier jobs: all layers);
        layer numbers are the model's (a pipeline stage's cache holds layers from first_layer)."""
        cond = self._cond
        layer_end -= self.first_layer
        with cond:
            deadline = None
            while not (self._done >= self._issued or (self._done == self._issued - 1 and self._layers >= layer_end)):
                # the thread wakes waiters only once a layer one of them wants is copied (a wake-up per layer
                # would take the GIL from the copies a dozen times a job)
                if self._done == self._issued - 1:  # waiting for an earlier job: its end wakes everyone
                    self._wanted = min(self._wanted, layer_end)
                deadline = deadline or time.monotonic() + self.timeout_s
                if not cond.wait(deadline - time.monotonic()) and time.monotonic() >= deadline:
                    raise RuntimeError(f"KV swap copies did not finish within {self.timeout_s:g}s (swap thread "
                                       f"{'alive' if self._thread.is_alive() else 'dead'})")

    def layers_done(self, request_ids: list[str], layer_start: int, layer_end: int) -> None:
        pass

    def tokens_sampled(self, token_ids: dict[str, int]) -> None:
        pass

    def poll(self) -> list[MoveResult]:
        with self._cond:
            results, self._results = self._results, []
        return results

    def counters(self) -> dict[str, float]:
        """Monotonic: moves, bytes and span copies by kind, failed copies, seconds copying."""
        values: dict[str, float] = {"copies_failed": self.num_failed}
        for kind in SWAP_KINDS:
            values[f"{kind}_moves"] = self.counts[kind]
            values[f"{kind}_bytes"] = self.blocks[kind] * self.num_layers * self.block_bytes
            values[f"{kind}_copies"] = self.copies[kind]
        values["copy_seconds"] = self.seconds.snapshot()["sum"]
        return values

    def histograms(self) -> dict[str, dict]:
        return {"kv_swap_seconds": self.seconds.snapshot()}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # ---- the thread ----
    def _serve_one(self) -> bool:
        """Copy the next job, waiting up to a second for one; False once closed with nothing left."""
        with self._cond:
            self._cond.wait_for(lambda: self._jobs or self._closed, _IDLE_WAIT_S)
            if not self._jobs:
                return not self._closed
            copies, results, ready = self._jobs[0]
        started = time.perf_counter()
        if ready is not None:
            self._stream.wait_event(ready)
        failed: dict[str, str] = {}
        for layer in range(self.num_layers):
            for copy in copies:
                if copy.request_id in failed:
                    continue
                try:
                    if self._stream is not None:
                        with torch.cuda.stream(self._stream):
                            copy.run(layer)
                    else:
                        copy.run(layer)
                except Exception as e:  # noqa: BLE001 - the move fails, the thread goes on
                    failed[copy.request_id] = f"{type(e).__name__}: {e}"
                    logger.error("KV %s of request %s failed at layer %d: %s", copy.kind, copy.request_id,
                                 layer, failed[copy.request_id])
            if self._stream is not None:
                self._stream.synchronize()
            # the last layer is published with the job's results, below: a waiter for every layer
            # returns only once they are there (the step that waits gets its swaps' results)
            if layer + 1 == self.num_layers:
                break
            with self._cond:
                self._layers = layer + 1
                if self._layers >= self._wanted:
                    self._wanted = _NOBODY  # woken waiters still short of their layer say so again
                    self._cond.notify_all()
        for copy in copies:
            reason = failed.get(copy.request_id)
            results.append(MoveResult(copy.request_id, copy.kind, FAILED if reason else FINISHED, reason or ""))
            if reason is None:
                self.counts[copy.kind] += 1
                self.blocks[copy.kind] += sum(n for _, _, n in copy.runs)
                self.copies[copy.kind] += len(copy.runs) * self.num_layers
        self.num_failed += sum(1 for r in results if r.state == FAILED)
        self.seconds.observe(time.perf_counter() - started)
        with self._cond:
            self._jobs.popleft()
            self._results += results
            self._done += 1
            self._layers = 0
            self._wanted = _NOBODY
            self._cond.notify_all()
        return True


def _serve(ref: weakref.ref) -> None:
    """The swap thread: jobs until its worker is closed or collected."""
    while True:
        worker = ref()
        if worker is None or not worker._serve_one():
            return
        del worker


class ComposedWorker:
    """Two connector workers behind one: swap moves to `swap`, every other move to `primary` (a
    transfer worker, or the null worker of a colocated instance); hooks go to both."""

    def __init__(self, primary, swap: SwapWorker) -> None:
        self.primary, self.swap = primary, swap
        self.address = primary.address

    def __getattr__(self, name: str):  # the primary's own attributes (e.g. a transfer worker's num_pending)
        return getattr(self.primary, name)

    def start(self, moves: list[KVMove]) -> None:
        swaps = [m for m in moves if m.kind in SWAP_KINDS]
        if swaps:
            self.swap.start(swaps)
        if len(swaps) < len(moves):
            self.primary.start([m for m in moves if m.kind not in SWAP_KINDS])

    def wait_layers(self, layer_start: int, layer_end: int) -> None:
        self.swap.wait_layers(layer_start, layer_end)

    def layers_done(self, request_ids: list[str], layer_start: int, layer_end: int) -> None:
        self.primary.layers_done(request_ids, layer_start, layer_end)

    def tokens_sampled(self, token_ids: dict[str, int]) -> None:
        self.primary.tokens_sampled(token_ids)

    def poll(self) -> list[MoveResult]:
        return self.swap.poll() + self.primary.poll()

    def counters(self) -> dict[str, float]:
        return self.primary.counters()  # the swap worker's are the engine's kv_swap group

    def histograms(self) -> dict[str, dict]:
        return {**self.primary.histograms(), **self.swap.histograms()}

    def close(self) -> None:
        self.swap.close()
        self.primary.close()



class _RankSwaps(ComposedWorker):
    """A worker rank's connector (tensor-parallel or pipeline): it swaps its own heads and layers of the
    blocks rank 0's scheduler names (the same block ids on every rank). Rank 0 hears only its own swaps'
    results, so a copy that fails here must not pass in silence: it fails the rank's step, and the group
    restarts. Every rank ends a plan's copies within its step, and a pipeline stage runs the plans in
    order, so rank 0's report of a plan (taken once every stage answered it) holds for all of them."""

    def poll(self) -> list[MoveResult]:
        results = super().poll()
        failed = [r for r in results if r.state == FAILED and r.kind in SWAP_KINDS]
        if failed:
            raise RuntimeError(f"KV {failed[0].kind} of request {failed[0].request_id} failed on this rank "
                               f"({failed[0].reason})")
        return results


def rank_swap_worker(kv_cache: torch.Tensor, num_host_blocks: int, first_layer: int = 0) -> ComposedWorker:
    """The connector of a worker rank that swaps: a host tier of num_host_blocks blocks of its layout
    (its heads, and its pipeline stage's layers from first_layer)."""
    from serving.kv_connector.base import NullWorker
    host_cache = torch.empty((kv_cache.shape[0], 2, num_host_blocks, *kv_cache.shape[3:]), dtype=kv_cache.dtype,
                             pin_memory=kv_cache.is_cuda)
    return _RankSwaps(NullWorker(), SwapWorker(kv_cache, host_cache, first_layer=first_layer))
