"""KV transfer between tensor-parallel plans against the same-plan transfer.

    python -m bench.kv_transfer_plans [--model-dir /tmp/small] [--tokens 512 2048] [--repeats 5] [--json F]

One request's KV (a prompt of N tokens of the model: its layer count, KV heads and head size, float32)
moves from a prefill instance's ranks (src_tp caches, each its heads) to a decode instance's ranks
(dst_tp caches) through KVSender -> gRPC -> KVReceiver, the receiver in a process of its own, over
gRPC payloads (grpc) and shared-memory slabs (shm). Each decode rank is sent exactly its heads; a plan
pair that differs gathers them from the prefill ranks that hold them (kvcache/transfer/plans.py). The
pairs run interleaved, each repetition in a fresh order; the table gives median times and each pair's
time over the same-plan 1 -> 1 transfer of the same path and length (ratio > 1: slower).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import statistics
import time

import torch
from tqdm import tqdm

from bench.kv_transfer import _FreeingAllocator
from kvcache.layout import KVCacheLayout
from kvcache.transfer import KVLayout, KVReceiver, KVSender, ReceiverServer, TransferConfig
from serving.models.config import ModelArchConfig

PAIRS = [(1, 1), (2, 2), (2, 1), (1, 2), (4, 1), (1, 4), (4, 2), (2, 4)]
PATHS = {"grpc": {"enable_shm": False}, "shm": {"one_sided": False}}
BLOCK_SIZE = 16
PIPE_TIMEOUT_S = 120.0


def layout_of(arch: ModelArchConfig, tp: int) -> KVLayout:
    cache = KVCacheLayout.for_model(arch.num_layers, arch.num_kv_heads, arch.head_dim, BLOCK_SIZE, "float32", tp, 0)
    return KVLayout.from_cache_layout(cache, "bench")


def _receiver_main(conn, layout: KVLayout, num_blocks: int, config: TransferConfig) -> None:
    torch.set_num_threads(1)  # copies are memory-bound; spinning OpenMP workers would take the other core
    caches = [layout.cache_layout.allocate(num_blocks) for _ in range(layout.tp_size)]
    server = ReceiverServer(KVReceiver(caches, layout, _FreeingAllocator(num_blocks, BLOCK_SIZE), config)).start()
    conn.send(server.address)
    conn.poll(24 * 3600.0)
    server.stop(grace_s=0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="/tmp/small")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    arch = ModelArchConfig.from_model_dir(args.model_dir)
    pairs = [(s, d) for s, d in PAIRS if max(s, d) <= max(arch.num_kv_heads, 4)]
    num_blocks = -(-max(args.tokens) // BLOCK_SIZE) + 4
    whole = torch.randn(arch.num_layers, 2, num_blocks, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim)
    src_caches = {}
    for tp in sorted({s for s, _ in pairs}):
        kv = layout_of(arch, tp)
        src_caches[tp] = [whole[..., slice(*kv.rank_cache_layout(r).kv_head_range()), :].contiguous()
                          for r in range(tp)]
    context = mp.get_context("spawn")
    receivers, senders = [], {}
    try:
        for path, changes in PATHS.items():
            config = TransferConfig(rpc_timeout_s=60.0, **changes)
            for dst_tp in sorted({d for _, d in pairs}):
                ours, theirs = context.Pipe()
                process = context.Process(target=_receiver_main, daemon=True,
                                          args=(theirs, layout_of(arch, dst_tp), num_blocks, config))
                process.start()
                assert ours.poll(PIPE_TIMEOUT_S), "a receiver process did not start"
                address = ours.recv()
                receivers.append((process, ours))
                for src_tp, d in pairs:
                    if d == dst_tp:
                        senders[(path, src_tp, dst_tp)] = KVSender(src_caches[src_tp], layout_of(arch, src_tp),
                                                                   address, lambda rid: None, config).connect()
        times: dict[tuple, list[float]] = {key + (n,): [] for key in senders for n in args.tokens}
        nbytes: dict[tuple, int] = {}
        runs = [key for key in times]
        counter = 0
        for _ in tqdm(range(args.repeats), desc="repetitions"):
            random.shuffle(runs)
            for key in runs:
                path, src_tp, dst_tp, tokens = key
                sender = senders[(path, src_tp, dst_tp)]
                counter += 1
                blocks = list(range(-(-tokens // BLOCK_SIZE)))
                start = time.perf_counter()
                handle = sender.begin(f"r{counter}", tokens, blocks)
                handle.send_layers(0, arch.num_layers)
                result = handle.finish(120.0)
                times[key].append(time.perf_counter() - start)
                assert result.ok, result.reason
                nbytes[key] = result.num_bytes
        rows = []
        for key, samples in times.items():
            path, src_tp, dst_tp, tokens = key
            base = statistics.median(times[(path, 1, 1, tokens)])
            median = statistics.median(samples)
            rows.append({"path": path, "prefill_tp": src_tp, "decode_tp": dst_tp, "tokens": tokens,
                         "bytes": nbytes[key], "median_ms": round(median * 1e3, 2),
                         "gb_per_s": round(nbytes[key] / median / 1e9, 3),
                         "time_vs_same_plan_1_1": round(median / base, 3)})
        rows.sort(key=lambda r: (r["path"], r["tokens"], r["prefill_tp"], r["decode_tp"]))
        print(f"{'path':5} {'tokens':>6} {'prefill→decode':>14} {'MiB':>7} {'ms':>8} {'GB/s':>6} {'vs 1→1':>7}")
        for r in rows:
            print(f"{r['path']:5} {r['tokens']:>6} {str(r['prefill_tp']) + ' → ' + str(r['decode_tp']):>14} "
                  f"{r['bytes'] / 2**20:>7.1f} {r['median_ms']:>8.1f} {r['gb_per_s']:>6.2f} "
                  f"{r['time_vs_same_plan_1_1']:>7.2f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"model": arch.__dict__ if hasattr(arch, "__dict__") else str(arch), "repeats": args.repeats,
                           "rows": rows}, f, indent=1, default=str)
    finally:
        for sender in senders.values():
            sender.close()
        for process, conn in receivers:
            conn.send("stop")
            process.join(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
