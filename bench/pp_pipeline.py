"""What pipelining buys: a batch of requests generated end to end by the offline engine, one rank against
tensor and pipeline parallelism, and pipeline stages with and without plans in flight.

    python -m bench.pp_pipeline --model DIR [--requests 16] [--prompt 128] [--tokens 32] [--repeats 3]
        [--partitions 7,5 8,4] [--json F]

Executors (each an `LLM`, all loaded up front, run in turn each repetition so drift hits them alike):
    tp1          one process, all its threads
    tp2          two tensor-parallel ranks, one thread each
    pp2          two pipeline stages, one thread each, up to 2 plans in flight (as served): while stage 1
                 works on one plan, stage 0 runs the next, each plan taking half of the running requests
    pp2-serial   the same stages with one plan at a time (the engine's depth set to 1): one batch
                 goes through the stages while the other idles, what pipelining is measured against
    pp2[7,5]     with --partitions: two stages of these layers (--pp-layer-partition), plans in flight
Reported: output tokens per second (median), the ratio to tp1, and for the stages the bubble,
1 - (sum of the stages' forward seconds) / (stages x wall seconds): the share of stage time idle.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the engine process: the ranks share the cores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--partitions", nargs="*", default=[], metavar="N,N",
                        help="also two stages of these layers each (--pp-layer-partition), plans in flight")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from scheduler import SamplingParams
    from serving.llm import LLM

    common = dict(max_model_len=args.prompt + args.tokens + 16, num_gpu_blocks_override=
                  args.requests * -(-(args.prompt + args.tokens) // 16) + 16)
    llms = {"tp1": LLM(args.model, **common), "tp2": LLM(args.model, tensor_parallel_size=2, **common),
            "pp2": LLM(args.model, pipeline_parallel_size=2, **common)}
    variants = {"tp1": ("tp1", 0), "tp2": ("tp2", 0), "pp2": ("pp2", 2), "pp2-serial": ("pp2", 1)}
    for partition in args.partitions:
        name = f"pp2[{partition}]"
        llms[name] = LLM(args.model, pipeline_parallel_size=2, pp_layer_partition=partition, **common)
        variants[name] = (name, 2)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    rates = {v: [] for v in variants}
    bubbles = {v: [] for v in variants}
    busy_shares = {v: [] for v in variants}  # per round: each stage's forward seconds / wall
    try:
        for round_ in range(args.repeats + 1):  # round 0 warms up
            for variant, (name, depth) in variants.items():
                llm = llms[name]
                core, runner = llm.engine.core, llm.engine.runner
                if depth:
                    core.pipeline_depth = core.scheduler.pipeline_depth = depth
                prompts = [[rng.randrange(10, 1000) for _ in range(args.prompt)] for _ in range(args.requests)]
                busy = list(getattr(runner, "stage_busy_seconds", []))
                started = time.perf_counter()
                outputs = llm.generate(prompts, params)
                wall = time.perf_counter() - started
                assert all(len(o.outputs[0].token_ids) == args.tokens for o in outputs)
                if round_:
                    rates[variant].append(args.requests * args.tokens / wall)
                    if len(busy) > 1:  # pipeline stages (a TP group's one entry is not a bubble)
                        spent = sum(runner.stage_busy_seconds) - sum(busy)
                        bubbles[variant].append(1 - spent / (len(busy) * wall))
                        busy_shares[variant].append([(after - before) / wall for before, after
                                                     in zip(busy, runner.stage_busy_seconds)])
            print(f"round {round_}/{args.repeats} done", file=sys.stderr, flush=True)
    finally:
        for llm in llms.values():
            llm.engine.close()
    base = statistics.median(rates["tp1"])
    print(f"\nmodel={args.model} {args.requests} requests x ({args.prompt} prompt + {args.tokens} output tokens), "
          f"medians of {args.repeats}")
    print(f"{'executor':>11} {'tokens/s':>9} {'vs tp1':>7} {'bubble':>7}  stages busy (share of wall)")
    rows = []
    for variant in variants:
        rate = statistics.median(rates[variant])
        bubble = statistics.median(bubbles[variant]) if bubbles[variant] else None
        shares = ([statistics.median(r[s] for r in busy_shares[variant]) for s in range(len(busy_shares[variant][0]))]
                  if busy_shares[variant] else None)
        rows.append({"executor": variant, "tokens_per_s": rate, "vs_tp1": rate / base, "bubble": bubble,
                     "stage_busy_share": shares})
        print(f"{variant:>11} {rate:>9.1f} {rate / base:>7.2f} " + (f"{bubble:>7.1%}" if bubble is not None else f"{'-':>7}")
              + ("  " + " ".join(f"{x:.0%}" for x in shares) if shares else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "requests": args.requests, "prompt": args.prompt, "tokens": args.tokens,
                       "repeats": args.repeats, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
