"""Swap throughput: block groups against single blocks (FastSwitch's point), through the real swap worker.

    python -m bench.swap [--model-dir /tmp/small] [--block-size 16] [--requests 8] [--context 512]
                         [--repeats 5] [--device cpu|cuda] [--json F]

A KV pool of the model's layout (its layers, KV heads and head size, float32) is first churned (requests
of random lengths allocated and freed, so the free list is in the order a serving pool's is), then
`--requests` requests grow side by side one token at a time to `--context` tokens, as decodes do, under
each allocation strategy: `lru` (single blocks, what a pool without groups hands out) and `groups`
(kvcache/allocation.py). Each request is then swapped out to a host tier and back in by
`serving.kv_connector.swap.SwapWorker` (the thread the engine runs), timed from `start` to the last
layer copied. Reported per strategy: blocks per request, span copies per swap (per layer and K/V
half counted once: a span covers both), medians of swap-out and swap-in time and bandwidth, and the
groups/lru ratios (goal: >= 5x in copies per swap and in bytes/s). The host tier's blocks come from
the same strategy, as the engine's do. Each repetition is bit-checked: what comes back equals what left.
With `--device cuda` the pool is on the GPU and the host tier pinned, as the engine has them, and the
copies go over PCIe on the worker's stream (`make gpu-check` runs it).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass

import torch

from kvcache.allocation import make_strategy
from kvcache.block_pool import BlockPool
from kvcache.kv_manager import KVCacheManager
from kvcache.layout import KVCacheLayout
from scheduler.kv_moves import SwapIn, SwapOut
from serving.kv_connector.swap import SwapWorker
from serving.models.config import ModelArchConfig


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int


SMALL = KVShape(12, 4, 64)  # pdserve make-model --size small


def churned_manager(num_blocks: int, block_size: int, strategy: str, seed: int) -> KVCacheManager:
    """A pool whose free list has been through random allocations and frees."""
    rng = random.Random(seed)
    kv = KVCacheManager(BlockPool(num_blocks, False, make_strategy(strategy)), block_size)
    live = []
    for i in range(4 * num_blocks // 8):
        if live and rng.random() < 0.5:
            kv.free(live.pop(rng.randrange(len(live))))
        tokens = rng.randint(1, 8) * block_size
        if kv.can_allocate(f"churn{i}", tokens):
            kv.allocate(f"churn{i}", tokens)
            live.append(f"churn{i}")
    for rid in live:
        kv.free(rid)
    return kv


def grow_side_by_side(kv: KVCacheManager, num_requests: int, context: int) -> list[list[int]]:
    for n in range(1, context + 1):
        for r in range(num_requests):
            kv.allocate(f"r{r}", n)
    return [list(kv.block_ids(f"r{r}")) for r in range(num_requests)]


def timed_swap(worker: SwapWorker, move, num_layers: int) -> float:
    started = time.perf_counter()
    worker.start([move])
    worker.wait_layers(0, num_layers)
    seconds = time.perf_counter() - started
    results = worker.poll()
    assert [r.state for r in results] == ["finished"], results
    return seconds


def measure(arch: KVShape | ModelArchConfig, strategy: str, args) -> dict:
    layout = KVCacheLayout.for_model(arch.num_layers, arch.num_kv_heads, arch.head_dim, args.block_size, "float32")
    per_request = -(-args.context // args.block_size)
    num_blocks = max(4 * per_request * args.requests, 256)
    kv = churned_manager(num_blocks, args.block_size, strategy, args.seed)
    tables = grow_side_by_side(kv, args.requests, args.context)
    host = churned_manager(num_blocks, args.block_size, strategy, args.seed + 1)
    host_tables = []
    for r in range(args.requests):
        host.allocate(f"r{r}", args.context)
        host_tables.append(list(host.block_ids(f"r{r}")))
    device = torch.device(args.device)
    cache = torch.randn(layout.shape(num_blocks), device=device)
    host_cache = torch.empty(layout.shape(num_blocks), pin_memory=device.type == "cuda")
    worker = SwapWorker(cache, host_cache)
    bytes_per_request = per_request * layout.bytes_per_block
    out_s, in_s, copies = [], [], []
    try:
        for _ in range(args.repeats):
            for blocks, host_blocks in zip(tables, host_tables):
                expected = cache[:, :, blocks].clone()
                before = worker.counters()["swap_out_copies"]
                out_s.append(timed_swap(worker, SwapOut("r", blocks, host_blocks), layout.num_layers))
                copies.append((worker.counters()["swap_out_copies"] - before) // layout.num_layers)
                cache[:, :, blocks] = 0.0
                in_s.append(timed_swap(worker, SwapIn("r", host_blocks, blocks), layout.num_layers))
                if not torch.equal(cache[:, :, blocks], expected):
                    raise AssertionError(f"{strategy}: a swapped request came back different")
    finally:
        worker.close()
    out_med, in_med = statistics.median(out_s), statistics.median(in_s)
    return {"strategy": strategy, "blocks_per_request": per_request, "bytes_per_request": bytes_per_request,
            "copies_per_swap_per_layer": statistics.median(copies), "swap_out_ms": out_med * 1e3,
            "swap_in_ms": in_med * 1e3, "swap_out_gb_s": bytes_per_request / out_med / 1e9,
            "swap_in_gb_s": bytes_per_request / in_med / 1e9}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=None, help="model whose KV layout to use (default: the small shape)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the engine's copies share them)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the KV pool is (cuda: the host tier pinned, as the engine keeps it)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    torch.set_num_threads(args.threads)
    arch = ModelArchConfig.from_model_dir(args.model_dir) if args.model_dir else SMALL
    rows = [measure(arch, strategy, args) for strategy in ("lru", "groups")]
    lru, groups = rows
    ratios = {"copies": lru["copies_per_swap_per_layer"] / groups["copies_per_swap_per_layer"],
              "swap_out_bandwidth": groups["swap_out_gb_s"] / lru["swap_out_gb_s"],
              "swap_in_bandwidth": groups["swap_in_gb_s"] / lru["swap_in_gb_s"]}
    print(f"layers={arch.num_layers} kv_heads={arch.num_kv_heads} head_dim={arch.head_dim} block_size="
          f"{args.block_size} requests={args.requests} context={args.context} threads={args.threads} "
          f"device={args.device}")
    print(f"{'allocation':>10} {'blocks':>6} {'MiB':>6} {'copies/layer':>12} {'out ms':>8} {'in ms':>8} "
          f"{'out GB/s':>8} {'in GB/s':>8}")
    for row in rows:
        print(f"{row['strategy']:>10} {row['blocks_per_request']:>6} {row['bytes_per_request'] / 2**20:>6.1f} "
              f"{row['copies_per_swap_per_layer']:>12.1f} {row['swap_out_ms']:>8.2f} {row['swap_in_ms']:>8.2f} "
              f"{row['swap_out_gb_s']:>8.2f} {row['swap_in_gb_s']:>8.2f}")
    print(f"groups / lru: {ratios['copies']:.1f}x fewer copies, swap-out {ratios['swap_out_bandwidth']:.2f}x and "
          f"swap-in {ratios['swap_in_bandwidth']:.2f}x the bandwidth (goal >= 5x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "ratios": ratios}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
