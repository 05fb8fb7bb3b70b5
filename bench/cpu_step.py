"""A CPU step against the memory bound: decode step time vs the time to stream the weights once.

    python -m bench.cpu_step --model DIR [--threads 1] [--cores 0] [--batch-sizes 1,2,4,8]
                             [--context 256] [--prefill-tokens 512] [--repeats 9] [--compare-plain]

A decode step must read every weight once (every linear layer and the LM head; the embedding only for
its B rows), so on CPU its floor is weight bytes / memory bandwidth. This script measures, in one
process and with the same pinned threads:

- the read bandwidth: the fastest of three streaming reads of a buffer 16x the last-level cache, torch's
  sum and amax and pdserve's native read (pdkernels/cpu_native.py:read_sum, eight vector sums in flight;
  torch's reductions read 20-30% slower on the 2-core box, which made the bound look 20-30% longer
  than it is until 2026-12-03);
- the model's weight bytes read per decode step;
- decode step time at each batch size (every request with --context tokens of context), and a
  prefill step of --prefill-tokens tokens (one request), through the model runner driven directly
  with synthetic StepPlans as `pdserve profile` does (forward, logits and sampling: a whole step);

and prints step time, the bound (bytes / bandwidth) and their ratio (the issue's goal: <= 1.2 at batch
1-8). Bandwidth and steps are sampled in interleaved rounds, so drift in the machine's load moves both.
Every round also runs the same steps with --enforce-eager (the model's Python path, where decode steps
otherwise run each layer range in one native call: serving/models/native_decoder.py): the "eager ms"
column. With --compare-plain every round also runs the same model with plain nn.Linear layers (the
transform of serving/models/cpu_linear.py undone), and the table gains the plain step time and the
speedup. --breakdown then runs each decode case again on the eager path with CPU-time counters around
the step's parts (linear layers, attention: KV write + paged attention, norms, rotary; the rest is
embedding, activations, input preparation and sampling) and prints each part's share of the step.
Times are wall-clock medians; the CPU time of the process is shown beside them (on a shared machine
the gap is time other jobs held the cores).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from bench.profile import _plan
from scheduler.step import StepPlan

_LLC_BYTES = 32 * 2**20


def read_bandwidth(buffer: torch.Tensor) -> tuple[float, str]:
    """Bytes per second of the fastest streaming read of `buffer` (one pass each), and which."""
    from pdkernels import cpu_native
    readers = [("sum", torch.sum), ("amax", torch.amax)]
    lib = cpu_native.library()
    if lib is not None:
        readers.append(("read_sum", lambda x: cpu_native.read_sum(lib, x)))
    best = (0.0, "")
    for name, fn in readers:
        started = time.perf_counter()
        fn(buffer)
        rate = buffer.nbytes / (time.perf_counter() - started)
        best = max(best, (rate, name))
    return best


def matmul_flops(size: int = 1024) -> float:
    """Float32 flops per second of one large square matmul (MKL's sgemm, near the cores' FMA peak):
    the compute roof a decode step meets when its rows times the weights' flops outrun memory."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    started = time.perf_counter()
    torch.mm(a, b)
    return 2 * size**3 / (time.perf_counter() - started)


def weight_bytes_per_decode_step(model: torch.nn.Module) -> int:
    """Bytes of every weight a decode step reads in full: all but the embedding table, plus the LM head
    (which is the embedding table when tied). A PackedLinear counts its [N, K] weight once, whatever
    copies it holds (only one is read per call)."""
    from serving.models.cpu_linear import PackedLinear
    embedding = model.embed_tokens.weight
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    total = sum(m.in_features * m.out_features * 4 + (m.bias.nbytes if m.bias is not None else 0) for m in packed)
    counted = {id(embedding)} | {id(p) for m in packed for p in m.parameters()}
    total += sum(p.nbytes for p in model.parameters() if id(p) not in counted)
    if not isinstance(model.lm_head, PackedLinear) and model.lm_head.weight is embedding:
        total += embedding.nbytes
    return total


def kv_bytes_per_decode_step(model: torch.nn.Module, batch: int, context: int) -> int:
    arch = model.config
    return batch * context * arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * 4


def time_step(runner, lens: list[int], num_new: list[int], step: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one runner.execute of a synthetic plan."""
    plan = _plan(runner, lens, num_new, step)
    started, cpu_started = time.perf_counter(), time.process_time()
    runner.execute(plan)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    runner.execute(StepPlan(finished_request_ids=list(plan.num_scheduled_tokens)))
    return wall, cpu


def run(runner, cases: dict[str, tuple[list[int], list[int]]], variants: dict, repeats: int,
        buffer: torch.Tensor) -> tuple[dict, list[float], list[float], list[str]]:
    """samples[variant][case] = [(wall, cpu), ...], bandwidth samples, matmul flop-rate samples and
    which read was fastest each round, in interleaved rounds."""
    samples = {v: {c: [] for c in cases} for v in variants}
    bandwidth: list[float] = []
    flops: list[float] = []
    readers: list[str] = []
    step = 0
    for round_ in range(repeats + 1):  # round 0 warms up every shape (oneDNN builds a kernel per M)
        rate, reader = read_bandwidth(buffer)
        flop_rate = matmul_flops()
        if round_:
            bandwidth.append(rate)
            readers.append(reader)
            flops.append(flop_rate)
        for variant, apply in variants.items():
            apply()
            for case, (lens, num_new) in cases.items():
                step += 1
                sample = time_step(runner, lens, num_new, step)
                if round_:
                    samples[variant][case].append(sample)
    return samples, bandwidth, flops, readers


def breakdown(runner, cases: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Per decode case, each part's share of the step's CPU time (timers wrap the functions the model
    and runner call; restored afterwards)."""
    from serving.models import causal_lm
    from serving.models.cpu_linear import PackedLinear
    from serving.runner import model_runner

    spent: dict[str, float] = {}

    def timed(part: str, fn):
        def wrapper(*args, **kwargs):
            started = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[part] = spent.get(part, 0.0) + time.process_time() - started
        return wrapper

    patches = [(PackedLinear, "forward", "linear"), (causal_lm, "rms_norm", "norms"),
               (causal_lm, "rotary_embedding", "rotary"), (model_runner, "write_kv", "attention"),
               (model_runner, "paged_attention", "attention")]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, part in patches:
        setattr(owner, name, timed(part, getattr(owner, name)))
    shares = {}
    try:
        for case, (lens, num_new) in cases.items():
            if not case.startswith("decode"):
                continue
            spent.clear()
            total = sum(time_step(runner, lens, num_new, 10**6 + i)[1] for i in range(repeats))
            shares[case] = {part: seconds / total for part, seconds in spent.items()}
            shares[case]["rest"] = 1 - sum(shares[case].values())
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    return shares


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (pdserve make-model --size small)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cores", default=None, help="cores to pin the compute threads to (default: the first "
                        "--threads allowed cores); 'none' leaves threads unpinned")
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--compare-plain", action="store_true", help="also time plain nn.Linear layers")
    parser.add_argument("--breakdown", action="store_true",
                        help="each part's share of a decode step on the eager (Python) path")
    parser.add_argument("--buffer-mib", type=int, default=16 * _LLC_BYTES // 2**20,
                        help="size of the bandwidth probe's buffer (default 16x a 32 MiB last-level cache)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from kvcache.config import CacheConfig
    from serving.models.cpu_linear import pack_linears, unpack_linears
    from serving.runner.cpu_threads import pin_compute_threads
    from serving.runner.model_runner import ModelRunner

    if args.cores == "none":
        torch.set_num_threads(args.threads)
        cores = None
    else:
        cores = ([int(c) for c in args.cores.split(",")] if args.cores
                 else sorted(os.sched_getaffinity(0))[:args.threads])
        pin_compute_threads(cores)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    num_blocks = (max(batch_sizes) * args.context + args.prefill_tokens) // 16 + 64
    runner = ModelRunner.load(args.model, CacheConfig(num_blocks_override=num_blocks), torch.device("cpu"),
                              torch.float32)
    model = runner.model
    cases = {f"decode b={b}": ([args.context] * b, [1] * b) for b in batch_sizes}
    cases[f"prefill {args.prefill_tokens}"] = ([args.prefill_tokens], [args.prefill_tokens])
    def variant(pack: bool, eager: bool):
        def apply():
            (pack_linears if pack else unpack_linears)(model)
            runner.enforce_eager = eager
            runner.bind_native_decoder()
        return apply
    variants = {"packed": variant(True, False), "eager": variant(True, True)}
    if args.compare_plain:
        variants["plain"] = variant(False, True)
    buffer = torch.ones(args.buffer_mib * 2**20 // 4)
    load_before = os.getloadavg()[0]
    samples, bandwidth, flops, readers = run(runner, cases, variants, args.repeats, buffer)
    variants["eager"]()  # the breakdown's timers wrap the Python path's parts
    bw = statistics.median(bandwidth)
    weights = weight_bytes_per_decode_step(model)
    print(f"\nmodel={args.model} threads={torch.get_num_threads()} cores={cores} context={args.context} "
          f"load(1 min)={load_before:.2f}->{os.getloadavg()[0]:.2f}")
    fastest = ", ".join(f"{reader} {readers.count(reader)}x" for reader in sorted(set(readers)))
    print(f"read bandwidth {bw / 1e9:.1f} GB/s (median of {len(bandwidth)}; min {min(bandwidth) / 1e9:.1f}, "
          f"max {max(bandwidth) / 1e9:.1f}; fastest read: {fastest}); weights read per decode step "
          f"{weights / 2**20:.0f} MiB -> bound {weights / bw * 1e3:.1f} ms")
    peak = statistics.median(flops)
    print(f"matmul {peak / 1e9:.0f} GFLOP/s (median of {len(flops)}): the compute roof of a decode step at batch B is "
          f"2 * B * weights / that ({2 * weights / 4 / peak * 1e3:.1f} ms per row); 'roof' = the larger of the two")
    header = (f"{'case':>14} {'step ms':>8} {'cpu ms':>7} {'bound ms':>9} {'ratio':>6} {'+KV ratio':>9} "
              f"{'roof ratio':>10} {'eager ms':>9} {'eager ratio':>11}")
    if args.compare_plain:
        header += f" {'plain ms':>9} {'plain cpu':>9} {'speedup':>8} {'cpu speedup':>11}"
    print(header)
    rows = []
    for case in cases:
        wall = statistics.median(s[0] for s in samples["packed"][case])
        cpu = statistics.median(s[1] for s in samples["packed"][case])
        row = {"case": case, "step_s": wall, "cpu_s": cpu}
        line = f"{case:>14} {wall * 1e3:>8.1f} {cpu * 1e3:>7.1f}"
        if case.startswith("decode"):
            batch = int(case.split("=")[1])
            bound = weights / bw
            with_kv = (weights + kv_bytes_per_decode_step(model, batch, args.context)) / bw
            roof = max(bound, 2 * batch * weights / 4 / peak)
            row.update(bound_s=bound, ratio=wall / bound, ratio_with_kv=wall / with_kv, roof_s=roof,
                       roof_ratio=wall / roof)
            line += f" {bound * 1e3:>9.1f} {wall / bound:>6.2f} {wall / with_kv:>9.2f} {wall / roof:>10.2f}"
        else:
            line += f" {'':>9} {'':>6} {'':>9} {'':>10}"
        eager = statistics.median(s[0] for s in samples["eager"][case])
        row["eager_step_s"] = eager
        line += f" {eager * 1e3:>9.1f}" + (f" {eager / row['bound_s']:>11.2f}" if "bound_s" in row else f" {'':>11}")
        if args.compare_plain:
            plain = statistics.median(s[0] for s in samples["plain"][case])
            plain_cpu = statistics.median(s[1] for s in samples["plain"][case])
            row.update(plain_step_s=plain, plain_cpu_s=plain_cpu, speedup=plain / wall, cpu_speedup=plain_cpu / cpu)
            line += f" {plain * 1e3:>9.1f} {plain_cpu * 1e3:>9.1f} {plain / wall:>7.2f}x {plain_cpu / cpu:>10.2f}x"
        rows.append(row)
        print(line)
    shares = breakdown(runner, cases, args.repeats) if args.breakdown else {}
    if shares:
        parts = ["linear", "attention", "norms", "rotary", "rest"]
        print(f"\nshare of decode step CPU time\n{'case':>14} " + " ".join(f"{p:>9}" for p in parts))
        for case, share in shares.items():
            print(f"{case:>14} " + " ".join(f"{share.get(p, 0.0):>9.1%}" for p in parts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "bandwidth_bps": bandwidth, "fastest_read": readers, "matmul_flops": flops,
                       "weight_bytes": weights, "rows": rows, "shares": shares,
                       "load": [load_before, os.getloadavg()[0]]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
