"""Offline throughput, pdserve against vLLM's CPU build, in one run on the same machine.

    python -m bench.offline_vs_vllm --model DIR [--vllm-python .venv-vllm/bin/python]
                                    [--batch-sizes 1,2,4,8,16,32,64] [--input-len 128] [--output-len 64]
                                    [--repeats 2] [--json out.json]

Each (system, batch size) runs in a fresh process, the systems alternating, on the same token-id prompts
(greedy, ignore_eos, prefix caching off). Three configurations:

- ``vllm``: vLLM's CPU build with its defaults (it pins its compute to core 0 with one torch thread and
  busy-polls its engine-core process on core 1; ``VLLM_CPU_KVCACHE_SPACE`` sized like pdserve's pool);
- ``pdserve-1core``: pdserve's ``LLM`` with one compute thread pinned to core 0 (the same compute vLLM gets);
- ``pdserve``: pdserve's ``LLM`` with its defaults (one compute thread per core).

Reported: output tokens per second (wall) of each, and the ratio of each pdserve configuration to vLLM
measured in this run (the median over --repeats). Greedy tokens of every system are compared with the
first one's: on the same weights they must agree (a differing request is reported, not hidden).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the child: runs one system on one batch, prints one JSON line
_CHILD = r"""
import json, os, sys, time
spec = json.loads(sys.argv[1])
prompts = json.load(open(spec["prompts"]))
B, out_len = len(prompts), spec["output_len"]
if spec["system"] == "vllm":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec["kv_gib"]))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    llm = LLM(model=spec["model"], dtype="float32", max_model_len=spec["max_model_len"], enforce_eager=True,
              enable_prefix_caching=False, max_num_seqs=max(B, 8), seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    warm = [TokensPrompt(prompt_token_ids=p[:16]) for p in prompts[:2]]
    llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    started = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    tokens = [list(o.outputs[0].token_ids) for o in outs]
else:
    sys.path.insert(0, spec["tree"])
    if spec["threads"]:
        from serving.runner.cpu_threads import pin_compute_threads
        pin_compute_threads(spec["cores"][:spec["threads"]])
    from serving.llm import LLM
    from scheduler import SamplingParams
    llm = LLM(spec["model"], max_num_seqs=max(B, 8), max_num_batched_tokens=2048, enable_prefix_caching=False,
              kv_cache_memory_bytes=f"{spec['kv_gib']}GiB", max_model_len=spec["max_model_len"])
    warm = [p[:16] for p in prompts[:2]]
    llm.generate(warm, [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)] * len(warm))
    started = time.perf_counter()
    outs = llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)] * B)
    elapsed = time.perf_counter() - started
    tokens = [list(o.outputs[0].token_ids) for o in outs]
n = sum(len(t) for t in tokens)
print("RESULT " + json.dumps({"seconds": elapsed, "output_tokens": n, "tok_per_s": n / elapsed, "tokens": tokens}))
"""

SYSTEMS = ("vllm", "pdserve-1core", "pdserve")


def run_child(system: str, args, prompts_file: str) -> dict:
    tree = str(Path(__file__).resolve().parents[1])
    spec = {"system": system, "model": args.model, "prompts": prompts_file, "output_len": args.output_len,
            "max_model_len": args.max_model_len, "kv_gib": args.kv_gib, "tree": tree,
            "threads": 1 if system == "pdserve-1core" else 0, "cores": [0]}
    python = str(Path(args.vllm_python).absolute()) if system == "vllm" else sys.executable
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([python, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True, env=env,
                          timeout=args.timeout_s, cwd=tempfile.gettempdir())
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{system} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    from bench.offline_throughput import make_prompts
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-gib", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown or not systems:
        parser.error(f"--systems: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(SYSTEMS)}")
    if "vllm" in systems and not Path(args.vllm_python).exists():
        parser.error(f"--vllm-python {args.vllm_python} does not exist: install vLLM's CPU build as "
                     "../shared/PEERS.md says, point --vllm-python at its interpreter, or leave vllm out of "
                     "--systems")
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    rows, mismatches = [], []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = make_prompts(vocab, batch, args.input_len, batch)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(prompts, f)
        runs: dict[str, list[float]] = {s: [] for s in systems}
        tokens: dict[str, list] = {}
        for _ in range(args.repeats):
            for system in systems:
                result = run_child(system, args, f.name)
                runs[system].append(result["tok_per_s"])
                tokens[system] = result["tokens"]
                print(f"batch {batch:3d} {system:14s} {result['tok_per_s']:8.1f} tok/s "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
        os.unlink(f.name)
        row = {"batch": batch, "load": os.getloadavg()[0], "output_tokens": result["output_tokens"]}
        for system in systems:
            row[system] = statistics.median(runs[system])
            row[system + "_runs"] = runs[system]
        if "vllm" in systems:
            for system in systems:
                if system != "vllm":
                    row[system + "_ratio"] = row[system] / row["vllm"]
        reference = systems[0]  # greedy, same weights: every system's tokens equal the first one's
        for system in systems[1:]:
            differ = sum(a != b for a, b in zip(tokens[system], tokens[reference]))
            row[system + "_differ"] = differ
            if differ:
                mismatches.append(f"batch {batch}: {differ} of {batch} requests differ ({system} vs {reference})")
        rows.append(row)
    head = ["batch"] + [f"{s} tok/s" for s in systems] + [f"{s} / vllm" for s in systems if s != "vllm" and "vllm" in systems]
    print("\n| " + " | ".join(head) + " |\n|" + " ---: |" * len(head))
    for row in rows:
        cells = [str(row["batch"])] + [f"{row[s]:.1f}" for s in systems]
        cells += [f"{row[s + '_ratio']:.2f}" for s in systems if s + "_ratio" in row]
        print("| " + " | ".join(cells) + " |")
    for line in mismatches:
        print("greedy tokens differ:", line)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "mismatches": mismatches, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
