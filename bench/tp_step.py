"""Step latency with tensor parallelism on this machine: TP = 1 against TP = N, same model, same steps.

    python -m bench.tp_step --model DIR [--tp 2] [--pp 2] [--prefill 512,1024,2048] [--decode 1,8,32]
                            [--context 256] [--repeats 5] [--json out.json]

Three executors of the same model, alternated step by step in one script so drift in the machine's
speed hits them alike:
    tp1         one ModelRunner with all the process's threads (N of them), as colocated serving runs it
                (decode steps of 1-8 rows take the native decode step)
    tp1-eager   the same runner with --enforce-eager (the Python path the TP ranks run)
    tpN         a TensorParallelRunner: rank 0 here with 1 thread, ranks 1.. spawned with 1 thread each
                (serving/runner/tensor_parallel.py), plans sent to every rank as the engine does
    ppM         (with --pp M) M pipeline stages of one rank each, 1 thread each: one plan's latency through
                every stage in turn (what a lone request sees; the overlap of plans in flight, which is
                what pipelining buys, is bench.pp_pipeline's to measure)
Each step is a synthetic plan (bench.profile's: prefill of one prompt, or a decode batch at the given
context), timed from execute() to its return. For tpN the table also shows the share of rank 0's step
spent inside collectives (all-reduce after o_proj and down_proj, the embedding's all-reduce, the
logits' all-gather): the communication and the wait for the slower rank together.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the engine process: the ranks share the cores
import torch  # noqa: E402

from bench.profile import _plan  # noqa: E402
from kvcache.config import CacheConfig  # noqa: E402
from scheduler.step import StepPlan  # noqa: E402


def timed_collectives(group) -> dict:
    """Wrap the group's collectives with a timer; returns the accumulator."""
    spent = {"seconds": 0.0}
    for name in ("all_reduce", "all_gather_last_dim"):
        original = getattr(group, name)

        def wrapper(x, original=original):
            started = time.perf_counter()
            try:
                return original(x)
            finally:
                spent["seconds"] += time.perf_counter() - started
        setattr(group, name, wrapper)
    return spent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=0, help="also time this many pipeline stages (0: not)")
    parser.add_argument("--prefill", default="512,1024,2048", help="prompt lengths of one-prompt prefill steps")
    parser.add_argument("--decode", default="1,8,32", help="batch sizes of decode steps")
    parser.add_argument("--context", type=int, default=256, help="context of each decode row")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from serving.runner.model_runner import ModelRunner
    from serving.runner.parallel_group import load_tensor_parallel_runner

    device, dtype = torch.device("cpu"), torch.float32
    threads = torch.get_num_threads()
    prefill = [int(n) for n in args.prefill.split(",") if n]
    decode = [int(b) for b in args.decode.split(",") if b]
    cases = {f"prefill {n}": ([n], [n]) for n in prefill}
    cases.update({f"decode b={b}": ([args.context] * b, [1] * b) for b in decode})
    block_size = 16
    num_blocks = max([-(-n // block_size) for n in prefill] + [b * -(-args.context // block_size) for b in decode]) + 8
    cache = CacheConfig(num_blocks_override=num_blocks, block_size=block_size)

    single = ModelRunner.load(args.model, cache, device, dtype)
    parallel = load_tensor_parallel_runner(args.model, cache, device, dtype, args.tp, collective_timeout_s=120.0)
    rank_threads = torch.get_num_threads()  # rank 0's share, as the group set it
    spent = timed_collectives(parallel.model.tensor_parallel)

    variants = {"tp1": (single, threads, False), "tp1-eager": (single, threads, True),
                f"tp{args.tp}": (parallel, rank_threads, None)}
    staged = None
    if args.pp > 1:
        staged = load_tensor_parallel_runner(args.model, cache, device, dtype, 1, collective_timeout_s=120.0, pp=args.pp)
        variants[f"pp{args.pp}"] = (staged, rank_threads, None)
    samples = {v: {c: [] for c in cases} for v in variants}
    collective = {c: [] for c in cases}
    step = 0
    try:
        for round_ in range(args.repeats + 1):  # round 0 warms every shape up
            for case, (lens, num_new) in cases.items():
                for variant, (runner, n_threads, eager) in variants.items():
                    torch.set_num_threads(n_threads)
                    if eager is not None and runner.enforce_eager != eager:
                        runner.enforce_eager = eager
                        runner.bind_native_decoder()
                    step += 1
                    plan = _plan(runner, lens, num_new, step)
                    spent["seconds"] = 0.0
                    started = time.perf_counter()
                    runner.execute(plan)
                    seconds = time.perf_counter() - started
                    in_collectives = spent["seconds"]
                    runner.execute(StepPlan(finished_request_ids=list(plan.num_scheduled_tokens)))
                    if round_:
                        samples[variant][case].append(seconds)
                        if runner is parallel:
                            collective[case].append(in_collectives / seconds)
            print(f"round {round_}/{args.repeats} done", file=sys.stderr, flush=True)
    finally:
        parallel.close()
        if staged is not None:
            staged.close()

    names = list(variants)
    print(f"\nmodel={args.model} tp={args.tp} threads: tp1 {threads}, each rank {rank_threads}; context {args.context}; "
          f"medians of {args.repeats}")
    print(f"{'case':>14} " + " ".join(f"{n + ' ms':>13}" for n in names)
          + f" {'tp1 / tp' + str(args.tp):>11} {'eager / tp' + str(args.tp):>12} {'collectives':>12}")
    rows = []
    for case in cases:
        ms = {n: statistics.median(samples[n][case]) * 1e3 for n in names}
        share = statistics.median(collective[case])
        tpn = ms[f"tp{args.tp}"]
        rows.append({"case": case, **{f"{n}_ms": v for n, v in ms.items()}, "collective_share": share})
        print(f"{case:>14} " + " ".join(f"{ms[n]:>13.1f}" for n in names)
              + f" {ms['tp1'] / tpn:>11.2f} {ms['tp1-eager'] / tpn:>12.2f} {share:>11.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "tp": args.tp, "threads": threads,
                                               "rank_threads": rank_threads, "context": args.context,
                                               "repeats": args.repeats, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
