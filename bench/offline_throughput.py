"""Offline throughput and per-step overhead of pdserve's engine against transformers' batched generate.

    python -m bench.offline_throughput --model DIR [--batch-sizes 1,8,32,64] [--input-len 128]
                                       [--output-len 128] [--temperature 0] [--threads N [--cores 0,1]]
                                       [--json out.json]

Both systems get the same token-id prompts (lengths spread +-25% around --input-len, so batching must
cope with ragged prompts). With --output-len-dist fixed every request produces exactly --output-len tokens
(ignore_eos); with uniform each request wants its own length, uniform in [1, 2*output_len - 1], as real
workloads do: pdserve gives each request its max_tokens, while transformers' static batch must run until
the longest request is done, and only each request's own tokens count as throughput. Overhead is the
share of the engine's wall time spent outside the model's forward pass (scheduling, batch preparation,
sampling, detokenization), in wall time and in this process's CPU time (on a shared machine the wall
share shrinks when other jobs slow the forward pass down; the CPU share does not). The ratio column is
pdserve's throughput over transformers' in this run. --threads pins that many compute threads, one per
core (serving/runner/cpu_threads.py), before anything runs; both systems use them.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch
from tqdm import tqdm


def make_prompts(vocab_size: int, batch: int, input_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lo, hi = max(1, int(input_len * 0.75)), int(input_len * 1.25)
    return [[rng.randrange(10, vocab_size) for _ in range(rng.randint(lo, hi))] for _ in range(batch)]


def make_output_lens(batch: int, output_len: int, dist: str, seed: int) -> list[int]:
    if dist == "fixed":
        return [output_len] * batch
    rng = random.Random(seed + 7)
    return [rng.randint(1, 2 * output_len - 1) for _ in range(batch)]


def run_pdserve(llm, prompts, output_lens: list[int], temperature: float = 0.0) -> dict:
    from scheduler import SamplingParams
    params = [SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True) for n in output_lens]
    runner = llm.engine.runner
    forward_before, forward_cpu_before = runner.forward_seconds, runner.forward_cpu_seconds
    started, cpu_started = time.perf_counter(), time.process_time()
    results = llm.generate(prompts, params)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    forward = runner.forward_seconds - forward_before
    forward_cpu = runner.forward_cpu_seconds - forward_cpu_before
    num_out = sum(len(r.outputs[0].token_ids) for r in results)
    return {"seconds": elapsed, "cpu_seconds": cpu, "output_tokens": num_out, "tok_per_s": num_out / elapsed,
            "overhead_share": max(0.0, 1 - forward / elapsed), "overhead_cpu_share": max(0.0, 1 - forward_cpu / cpu)}


def run_transformers(model, prompts, output_lens: list[int], pad_id: int, temperature: float = 0.0) -> dict:
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as generate expects for decoder-only models
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    started = time.perf_counter()
    with torch.no_grad():
        # one static batch runs until its longest request is done
        longest_out = max(output_lens)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
            else {"do_sample": False}
        out = model.generate(ids, attention_mask=mask, max_new_tokens=longest_out, min_new_tokens=longest_out,
                             pad_token_id=pad_id, **sampling)
    if out.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    assert out.shape[1] - longest == longest_out
    num_out = sum(output_lens)  # the tokens each request asked for
    return {"seconds": elapsed, "output_tokens": num_out, "tok_per_s": num_out / elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (e.g. from pdserve make-model --size small)")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--output-len-dist", choices=["fixed", "uniform"], default="fixed",
                        help="every request --output-len tokens, or uniform in [1, 2*output_len-1]")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy (the default); above 0 random sampling, as a server's requests get by "
                             "default (OpenAI's temperature is 1)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="both systems' weights and KV (auto: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="compute threads, pinned one per core (default: torch's default, unpinned)")
    parser.add_argument("--cores", default=None, help="cores for --threads (default: the first allowed ones)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="pdserve without its native CPU decode step / CUDA graphs (the A/B of those)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        from serving.runner.cpu_threads import pin_compute_threads
        cores = ([int(c) for c in args.cores.split(",")] if args.cores
                 else sorted(os.sched_getaffinity(0))[:args.threads])
        pin_compute_threads(cores)

    from transformers import AutoModelForCausalLM
    from serving.llm import LLM

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    llm = LLM(args.model, max_num_seqs=max(batch_sizes), max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=False, kv_cache_memory_bytes="2GiB", dtype=args.dtype,
              enforce_eager=args.enforce_eager)
    runner = llm.engine.runner
    dtype = runner.kv_cache.dtype
    hf = None if args.skip_transformers else AutoModelForCausalLM.from_pretrained(
        args.model, dtype=dtype).to(runner.device).eval()
    vocab = llm.engine.vocab_size
    run_pdserve(llm, make_prompts(vocab, 2, 16, 99), [4, 4])  # warm-up
    rows = []
    for batch in tqdm(batch_sizes, desc="batch sizes"):
        prompts = make_prompts(vocab, batch, args.input_len, args.seed + batch)
        output_lens = make_output_lens(batch, args.output_len, args.output_len_dist, args.seed + batch)
        row = {"batch": batch, "pdserve": run_pdserve(llm, prompts, output_lens, args.temperature)}
        if hf is not None:
            row["transformers"] = run_transformers(hf, prompts, output_lens, pad_id=0, temperature=args.temperature)
            row["ratio"] = row["pdserve"]["tok_per_s"] / row["transformers"]["tok_per_s"]
        rows.append(row)
    print(f"\nmodel={args.model} input_len~{args.input_len} output_len={args.output_len} "
          f"({args.output_len_dist}) temperature={args.temperature:g} device={runner.device} "
          f"dtype={str(dtype).removeprefix('torch.')} "
          f"threads={torch.get_num_threads()} load(1 min)={os.getloadavg()[0]:.2f}")
    print(f"{'batch':>5} {'pdserve tok/s':>14} {'overhead':>9} {'cpu overhead':>13} {'transformers tok/s':>19} "
          f"{'ratio':>6}")
    for row in rows:
        hf_tps = row.get("transformers", {}).get("tok_per_s", float("nan"))
        ours = row["pdserve"]
        print(f"{row['batch']:>5} {ours['tok_per_s']:>14.1f} {ours['overhead_share']:>8.1%} "
              f"{ours['overhead_cpu_share']:>12.1%} {hf_tps:>19.1f} {row.get('ratio', float('nan')):>6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
