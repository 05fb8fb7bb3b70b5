"""`pdserve profile`: measure prefill and decode step latency on this hardware and fit the latency model.

    pdserve profile --model DIR --out latency.json [--quick] [--threads N]
    pdserve profile --model DIR --out LATENCY_DIR/        (writes LATENCY_DIR/latency-tp1-pp1.json)
    pdserve profile --model DIR --tensor-parallel-size 2 --out LATENCY_DIR/   (latency-tp2-pp1.json)
    pdserve profile --model DIR --pipeline-parallel-size 2 --out LATENCY_DIR/ (latency-tp1-pp2.json)
    pdserve profile --from-trace TRACE_DIR_OR_FILE... --out latency.json     (no model run: see below)

A latency-model set for the simulator and planner is one such file per TP x PP plan (its meta says tp
and pp); a directory of them is what `--latency-model` takes. A plan with pipeline stages is timed as
a lone plan going through all its stages (what one step costs alone); the simulator overlaps plans in
flight as the runtime does (scheduler/latency_executor.py). Plans not profiled are scaled from a
profiled one by the rule in scheduler/latency_plans.py. Profile with the torch threads an instance will
have (`--threads`: an instance of a disaggregated deployment gets num_cpus_per_instance threads).

--from-trace fits the model from the steps a *serving* engine took instead (`pdserve serve
--step-trace-dir DIR` writes them; scheduler/step_trace.py): the step cost in place, with the API
server, the router, KV transfer and the neighbours it really has. For 1P1D give both instances'
files: the prefill instance's steps fit prefill, the decode instance's decode. A pipelined engine's
trace (`--pipeline-parallel-size N` with it) fits a plan's latency (its own work through the stages
plus the hand-offs) and the busiest stage's hold (`meta.stage`) from the plans it ran
(scheduler/step_trace.py: fit_pipelined).

Otherwise it drives the model runner directly with synthetic StepPlans (no scheduler, no HTTP), so each sample is one
forward pass plus sampling, exactly what a serving step costs. The fitted model (scheduler/latency_model.py)
is what the placement planner and simulator read. Beside the steps it times the engine's swap worker on
the same cache (`meta.swap`: bytes per second and seconds per copy), which prices swaps in a simulated
deployment with --preemption-mode swap.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from scheduler.latency_model import LatencyModel, fit_decode, fit_prefill
from scheduler.latency_plans import save_set
from scheduler.sampling_params import SamplingParams
from scheduler.step import NewRequestData, StepPlan

_GREEDY = SamplingParams(temperature=0.0, max_tokens=1)


def _plan(runner, lens: list[int], num_new: list[int], step: int) -> StepPlan:
    """One step where request i has lens[i] tokens of context, the last num_new[i] of them computed now."""
    block_size = runner.block_size
    plan, next_block = StepPlan(), 0
    for i, (length, new) in enumerate(zip(lens, num_new)):
        num_blocks = -(-length // block_size)
        rid = f"p{step}-{i}"
        # token ids don't change the cost; the cache content of "already computed" tokens is stale data
        plan.new_requests.append(NewRequestData(rid, [7] * length, length, _GREEDY,
                                                list(range(next_block, next_block + num_blocks)), length - new))
        plan.num_scheduled_tokens[rid] = new
        next_block += num_blocks
    return plan


def time_step(runner, lens: list[int], num_new: list[int], repeats: int, step: int) -> tuple[float, float]:
    """Median seconds of the step, and of its busiest pipeline stage's compute (the step's, without
    stages)."""
    samples, stage_samples = [], []
    stages = getattr(runner, "stage_busy_seconds", None)
    for r in range(repeats):
        plan = _plan(runner, lens, num_new, step * 100 + r)
        busy = list(stages) if stages is not None else None
        started = time.perf_counter()
        runner.execute(plan)
        samples.append(time.perf_counter() - started)
        stage_samples.append(max(after - before for before, after in zip(busy, stages)) if busy else samples[-1])
        runner.execute(StepPlan(finished_request_ids=list(plan.num_scheduled_tokens)))
    return statistics.median(samples), statistics.median(stage_samples)


def measure_swap_cost(kv_cache: torch.Tensor, num_blocks: int = 64, repeats: int = 5) -> dict:
    """The swap copies' cost on this cache (`SwapCost` in scheduler/latency_model.py), through the
    engine's own swap worker: num_blocks blocks swapped out and back in as one run and as single
    blocks (every other block id); the two timings give the per-byte and the per-copy cost."""
    from scheduler.kv_moves import SwapIn, SwapOut
    from serving.kv_connector.swap import SwapWorker

    num_layers, block_bytes = kv_cache.shape[0], kv_cache[:, :, 0].numel() * kv_cache.element_size()
    num_blocks = min(num_blocks, kv_cache.shape[2] // 2)
    host = torch.empty((num_layers, 2, num_blocks, *kv_cache.shape[3:]), dtype=kv_cache.dtype,
                       pin_memory=kv_cache.is_cuda)
    worker = SwapWorker(kv_cache, host)
    try:
        def timed(block_ids: list[int]) -> float:
            samples = []
            for r in range(repeats + 1):  # the first touches the host pages
                started = time.perf_counter()
                worker.start([SwapOut(f"out{r}", block_ids, list(range(num_blocks)))])
                worker.wait_layers(0, num_layers)
                worker.start([SwapIn(f"in{r}", list(range(num_blocks)), block_ids)])
                worker.wait_layers(0, num_layers)
                samples.append((time.perf_counter() - started) / 2)
                worker.poll()
            return statistics.median(samples[1:])
        one_run = timed(list(range(num_blocks)))  # consecutive on both sides: one copy per layer
        single = timed(list(range(0, 2 * num_blocks, 2)))  # a copy per block and layer
    finally:
        worker.close()
    per_copy = max(0.0, (single - one_run) / ((num_blocks - 1) * num_layers))
    moving = max(one_run - num_layers * per_copy, 1e-9)
    return {"bytes_per_s": num_blocks * block_bytes / moving, "seconds_per_copy": per_copy,
            "samples": {"blocks": num_blocks, "block_bytes": block_bytes, "one_run_s": one_run,
                        "single_blocks_s": single}}


def grids(quick: bool, max_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    lengths = [16, 64, 256] if quick else [32, 128, 256, 512, 1024, 2048]
    prefill = [[n] * b for n in lengths for b in (1, 2) if n * b <= max_tokens]
    batch_sizes = [1, 4, 16] if quick else [1, 4, 16, 32, 64]
    contexts = [64, 256] if quick else [128, 512, 1024, 2048]
    decode = [[c] * b for b in batch_sizes for c in contexts if c * b <= max_tokens * 16]
    return prefill, decode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the built-in tiny model)")
    parser.add_argument("--out", default="latency_model.json", help="where to write the fitted model")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--max-tokens", type=int, default=2048, help="largest prefill batch in tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a small grid (seconds, for smoke tests)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's; match the instances you will simulate)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="profile this many ranks (rank processes, as `pdserve serve --tensor-parallel-size` "
                             "runs them; --threads is the instance's total, split between its ranks); with "
                             "--from-trace: the plan the traced engine ran")
    parser.add_argument("--pipeline-parallel-size", type=int, default=1,
                        help="profile this many pipeline stages (rank processes, as `pdserve serve "
                             "--pipeline-parallel-size` runs them; --threads is split between all ranks)")
    parser.add_argument("--pp-layer-partition", default=None, metavar="N,N,..",
                        help="layers of each pipeline stage, as `pdserve serve --pp-layer-partition` (default: "
                             "the even split)")
    parser.add_argument("--from-trace", nargs="+", default=None, metavar="TRACE",
                        help="fit from step traces (files or directories of *.jsonl written with "
                             "`pdserve serve --step-trace-dir`) instead of running the model")
    args = parser.parse_args(argv)
    if args.tensor_parallel_size < 1 or args.pipeline_parallel_size < 1:
        parser.error("--tensor-parallel-size and --pipeline-parallel-size must be at least 1")
    if args.pp_layer_partition and args.pipeline_parallel_size == 1:
        parser.error("--pp-layer-partition splits pipeline stages: give --pipeline-parallel-size too")
    if args.from_trace:
        return fit_from_trace(args.from_trace, args.out, args.tensor_parallel_size, args.pipeline_parallel_size)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))

    from kvcache.config import CacheConfig
    from serving.engine.engine import resolve_model_dir
    from serving.runner.model_runner import ModelRunner, resolve_device, resolve_dtype

    model_dir = resolve_model_dir(args.model)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    prefill_grid, decode_grid = grids(args.quick, args.max_tokens)
    most_tokens = max(sum(b) for b in prefill_grid + decode_grid)
    cache = CacheConfig(num_blocks_override=most_tokens // 16 + 64)
    tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
    partition = ()
    if pp > 1:
        from serving.models.config import ModelArchConfig
        from serving.models.pipeline import layer_partition
        try:
            partition = layer_partition(ModelArchConfig.from_model_dir(model_dir).num_layers, pp,
                                        args.pp_layer_partition)
        except ValueError as e:
            parser.error(str(e))
    if tp > 1 or pp > 1:
        from serving.runner.parallel_group import load_tensor_parallel_runner
        runner = load_tensor_parallel_runner(model_dir, cache, device, dtype, tp, pp=pp, pp_partition=partition)
    else:
        runner = ModelRunner.load(model_dir, cache, device, dtype)
    try:
        time_step(runner, [8], [8], 2, step=0)  # warm-up
        prefill, decode = [], []
        with tqdm(total=len(prefill_grid) + len(decode_grid), desc="profiling steps") as bar:
            for i, lens in enumerate(prefill_grid):
                prefill.append(time_step(runner, lens, lens, args.repeats, step=1 + i))
                bar.update(1)
            for i, ctx in enumerate(decode_grid):
                decode.append(time_step(runner, ctx, [1] * len(ctx), args.repeats, step=1000 + i))
                bar.update(1)
        swap = measure_swap_cost(runner.kv_cache)  # for --preemption-mode swap (rank 0's share of a block)
    finally:
        runner.close()
    prefill_s, decode_s = [s for s, _ in prefill], [s for s, _ in decode]
    meta = {"model": model_dir, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "tp": tp, "pp": pp,
            "pp_partition": list(partition),
            "processor": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
            "prefill_samples": [[lens, s] for lens, s in zip(prefill_grid, prefill_s)],
            "decode_samples": [[ctx, s] for ctx, s in zip(decode_grid, decode_s)], "swap": swap}
    if pp > 1:  # how long a plan holds the busiest stage: what plans in flight overlap (latency_executor.py)
        meta["stage"] = {"prefill": asdict(fit_prefill(prefill_grid, [b for _, b in prefill])),
                         "decode": asdict(fit_decode(decode_grid, [b for _, b in decode]))}
        meta["stage_samples"] = {"prefill": [b for _, b in prefill], "decode": [b for _, b in decode]}
    model = LatencyModel(fit_prefill(prefill_grid, prefill_s), fit_decode(decode_grid, decode_s), meta=meta)
    out = args.out
    if out.endswith("/") or os.path.isdir(out):
        out = save_set([model], out)[0]
    else:
        model.save(out)
    p, d = model.prefill, model.decode
    print(f"prefill(s) = {p.a:.3e} + {p.b:.3e}*sum(len) + {p.c:.3e}*sum(len^2)   R^2={p.r2:.3f}")
    print(f"decode(s)  = {d.a:.3e} + {d.b:.3e}*sum(ctx) + {d.c:.3e}*batch        R^2={d.r2:.3f}")
    print(f"swap(s)    = bytes / {swap['bytes_per_s'] / 1e9:.2f} GB/s + {swap['seconds_per_copy'] * 1e6:.1f} us per "
          "copy (one per run of blocks and layer)")
    print(f"wrote {out}")
    return 0


def fit_from_trace(paths: list[str], out: str, tp: int = 1, pp: int = 1) -> int:
    from scheduler import step_trace
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        print(f"pdserve profile: no such trace: {', '.join(missing)}", file=sys.stderr)
        return 2
    steps = step_trace.read(paths)
    meta = {"traces": [os.path.abspath(p) for p in paths], "tp": tp, "pp": pp}
    try:
        if pp > 1:
            model = step_trace.fit_pipelined(steps, meta=meta)
        elif step_trace.is_pipelined(steps):
            raise ValueError("these traces are a pipelined engine's: give --pipeline-parallel-size (its stages)")
        else:
            model = step_trace.fit(steps, meta=meta)
    except ValueError as e:
        print(f"pdserve profile: {e}", file=sys.stderr)
        return 2
    if out.endswith("/") or os.path.isdir(out):
        out = save_set([model], out)[0]
    else:
        model.save(out)
    p, d = model.prefill, model.decode
    print(f"{len(steps)} traced steps ({model.meta['num_prefill_steps']} with prefill, {model.meta['num_mixed_steps']} "
          f"mixed, {model.meta['num_decode_steps']} decode only)")
    print(f"prefill(s) = {p.a:.3e} + {p.b:.3e}*sum(len) + {p.c:.3e}*sum(len^2)   R^2={p.r2:.3f}")
    print(f"decode(s)  = {d.a:.3e} + {d.b:.3e}*sum(ctx) + {d.c:.3e}*batch        R^2={d.r2:.3f}")
    if pp > 1:
        s = model.stage_model()
        print(f"hand-offs between stages {model.meta['hand_off_seconds'] * 1e3:.2f} ms a plan (from "
              f"{model.meta['num_alone_plans']} plans alone in the pipeline); the busiest stage holds a plan "
              f"({model.meta['num_held_plans']} plans with a hold):")
        print(f"  prefill(s) = {s.prefill.a:.3e} + {s.prefill.b:.3e}*sum(len) + {s.prefill.c:.3e}*sum(len^2)")
        print(f"  decode(s)  = {s.decode.a:.3e} + {s.decode.b:.3e}*sum(ctx) + {s.decode.c:.3e}*batch")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
