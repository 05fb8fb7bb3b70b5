"""`pdserve` command line: serve, make-model, bench, profile, simulate, plan.

Flags follow vLLM's names where the meaning is the same. Every `serve` flag is also a key of
`--config FILE.yaml`; flags given on the command line win over the file.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from kvcache.config import parse_bytes


def _bool_flag(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    parser.add_argument(f"--{name}", default=None, action=argparse.BooleanOptionalAction, help=help)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_tag", nargs="?", default=None, help="model directory (same as --model)")
    parser.add_argument("--config", default=None, help="YAML file with any of these flags as keys")
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="local Hugging Face model directory (default: the built-in tiny model)")
    g.add_argument("--served-model-name", default=None, help="name clients send as 'model'")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    g.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    g.add_argument("--max-model-len", type=int, default=None, help="context length (prompt + output)")
    g.add_argument("--seed", type=int, default=None)
    _bool_flag(g, "enforce-eager", "run every step through the model's Python modules (off: decode steps of "
               "1-8 rows on CPU run each layer range in one native call, on CUDA replay captured CUDA graphs; "
               "less overhead)")
    g.add_argument("--cuda-graph-sizes", default=None, metavar="N[,N..]",
                   help="decode batch sizes captured as CUDA graphs (GPU only): one N for 1, 2, 4 and every 8 up to "
                   "N, several for exactly those, 0 for none (default: up to --max-num-seqs, at most 512)")
    g = parser.add_argument_group("KV cache and scheduler")
    g.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default 16)")
    g.add_argument("--kv-cache-memory-bytes", type=parse_bytes, default=None,
                   help="KV pool memory budget (per rank), e.g. 512MiB or 4GiB (default: 512MiB on CPU; on CUDA "
                   "what --gpu-memory-utilization leaves)")
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="CUDA, without --kv-cache-memory-bytes: the share of the GPU's memory the instance takes "
                   "in all, the KV pool sized to fill it (default 0.9)")
    g.add_argument("--num-gpu-blocks-override", type=int, default=None,
                   help="fix the number of KV blocks instead of deriving it from the budget")
    _bool_flag(g, "enable-prefix-caching", "reuse KV of shared prompt prefixes (default on)")
    g.add_argument("--max-num-seqs", type=int, default=None, help="cap on running requests (default 128)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget per step; longer prompts are prefilled in chunks (default 2048)")
    _bool_flag(g, "enable-chunked-prefill", "split long prompts across steps (default on)")
    from scheduler.policies.ordering import SCHEDULING_POLICIES
    g.add_argument("--scheduling-policy", default=None, choices=SCHEDULING_POLICIES,
                   help="order of waiting requests: fcfs; priority (the request's `priority` field, lower "
                        "first; a waiting request may preempt a running one it outranks); or vtc (fair "
                        "shares between clients, the OpenAI `user` field: docs/fairness.md) (default fcfs)")
    g.add_argument("--fairness-prefill-weight", type=float, default=None, metavar="WEIGHT",
                   help="vtc: what a prompt token adds to its client's service counter (default 1)")
    g.add_argument("--fairness-decode-weight", type=float, default=None, metavar="WEIGHT",
                   help="vtc: what an output token adds to its client's service counter (default 2)")
    g.add_argument("--fairness-update-interval", type=int, default=None, metavar="STEPS",
                   help="vtc: steps between re-rankings of the waiting queue by the counters (default 1)")
    g.add_argument("--fairness-preemption-threshold", type=float, default=None, metavar="TOKENS",
                   help="vtc: a waiting request preempts a running one whose client's counter is this many "
                        "weighted tokens ahead; 0: never (default 2 x the larger weight x --max-model-len)")
    g.add_argument("--client-weights", default=None, metavar="CLIENT:WEIGHT,...",
                   help="vtc: shares per client, e.g. alice:2,bob:1 (alice gets twice bob's service; "
                        "clients not named weigh 1)")
    g.add_argument("--preemption-mode", default=None, choices=["recompute", "swap"],
                   help="what a preempted request's KV becomes: recompute (dropped, prefilled again on "
                        "resume) or swap (copied to host memory, copied back on resume) (default recompute)")
    g.add_argument("--swap-space", type=float, default=None,
                   help="GiB of host memory for swapped-out KV with --preemption-mode swap (default 4)")
    g.add_argument("--block-allocation", default=None, choices=["auto", "lru", "groups"],
                   help="which free KV blocks a request gets: lru (single blocks), groups (runs of "
                        "consecutive blocks, one copy per run when swapping), auto (groups when swapping) "
                        "(default auto)")
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    g.add_argument("--max-request-bytes", type=parse_bytes, default=None,
                   help="largest accepted request body (default 4MiB)")
    g.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    g.add_argument("--shutdown-timeout", "--shutdown-timeout-s", dest="shutdown_timeout_s", type=float,
                   default=None, help="on SIGTERM/SIGINT, seconds running requests may take to finish "
                   "before they end with a 503 (default 30; 0: at once)")
    g.add_argument("--request-header-timeout-s", type=float, default=None,
                   help="close a connection whose request headers are not complete in this time (default 10)")
    g.add_argument("--request-body-timeout-s", type=float, default=None,
                   help="answer 408 to a request whose body is not complete in this time (default 30)")
    g = parser.add_argument_group("deployment")
    g.add_argument("--mode", default=None, choices=["colocated", "disaggregated"])
    g.add_argument("--num-replicas", type=int, default=None,
                   help="colocated: data-parallel replicas behind the router (default 1: the engine in-process)")
    g.add_argument("--tensor-parallel-size", type=int, default=None,
                   help="ranks each instance splits its heads and MLP columns over (docs/parallelism.md)")
    g.add_argument("--prefill-tp", type=int, default=None,
                   help="disaggregated: tensor-parallel size of the prefill instances (CPU only for now)")
    g.add_argument("--decode-tp", type=int, default=None,
                   help="disaggregated: tensor-parallel size of the decode instances (CPU only for now)")
    g.add_argument("--pipeline-parallel-size", type=int, default=None,
                   help="pipeline stages each instance splits its layers over, several plans in flight "
                        "(per role: pipeline_parallel_size in the YAML role sections)")
    g.add_argument("--pp-layer-partition", default=None, metavar="N,N,..",
                   help="layers of each pipeline stage, e.g. 7,5 (vLLM's VLLM_PP_LAYER_PARTITION; default: "
                        "an even split, a remainder on the stages before the last, which also holds the LM head)")
    g.add_argument("--num-prefill", type=int, default=None, help="prefill instances (disaggregated)")
    g.add_argument("--num-decode", type=int, default=None, help="decode instances (disaggregated)")
    g.add_argument("--launcher", default=None, choices=["local", "ray"])
    g.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")
    g.add_argument("--internal-host", default=None,
                   help="address the internal gRPC ports bind to (default 127.0.0.1)")
    _bool_flag(g, "engine-process", "run the engine (scheduler, model, KV cache) in a process of its own, "
               "apart from the HTTP server or instance service (default on; off: a thread of theirs)")
    g.add_argument("--cpu-threads-bind", default=None, metavar="nobind|auto|CORES",
                   help="CPU: where the colocated engine process computes — nobind (default): one unpinned "
                        "thread per core; auto: every core but the last, one pinned thread each, the last left "
                        "to the HTTP server (vLLM's layout); or a core list such as 0-2,5")
    g.add_argument("--step-trace-dir", default=None, metavar="DIR",
                   help="every engine appends each step's shape and duration to DIR/<role>-<pid>.jsonl, for "
                        "`pdserve profile --from-trace` (a latency model measured in place); default off")
    _bool_flag(g, "same-node", "Ray: keep each prefill/decode pair on one node (placement group)")
    g.add_argument("--num-cpus-per-instance", type=float, default=None, help="Ray: CPUs per instance")
    g.add_argument("--num-gpus-per-instance", type=float, default=None, help="Ray: GPUs per instance")
    g.add_argument("--instance-timeout-s", type=float, default=None,
                   help="deadline of router -> instance calls and stream silences (default 120)")
    g.add_argument("--instance-start-timeout-s", type=float, default=None,
                   help="how long an instance may take to start (default 300)")
    g.add_argument("--health-check-interval-s", type=float, default=None, help="default 1")
    _bool_flag(g, "restart-failed-instances", "start a dead instance again (default on)")
    _bool_flag(g, "prefill-while-reserving",
               "start a request's prefill while its decode instance reserves KV blocks, when the router "
               "estimates it has them (default on; off: once the decode instance has accepted)")
    _bool_flag(g, "reprefill-on-decode-failure",
               "a decode instance dies mid-stream: prefill its requests again elsewhere (default off: "
               "they end with an error)")
    g.add_argument("--kv-transfer-failure-policy", default=None, choices=["recompute", "fail"],
                   help="a KV transfer failed after its retries: recompute the prompt on the decode "
                        "instance or fail the request (default recompute)")
    g.add_argument("--kv-transfer-max-retries", type=int, default=None, help="default 1")
    g.add_argument("--kv-transfer-rpc-timeout-s", type=float, default=None, help="default 10")
    g.add_argument("--kv-transfer-stall-timeout-s", type=float, default=None, help="default 30")
    g.add_argument("--kv-transfer-lease-ttl-s", type=float, default=None,
                   help="a prefill instance frees a sent prompt's KV if the decode side has not "
                        "acknowledged it within this many seconds (default 60)")
    _bool_flag(g, "kv-transfer-enable-shm", "same-host KV moves through shared memory (default on)")
    _bool_flag(g, "kv-transfer-checksum", "verify a CRC-32 of every KV chunk on receive; a mismatch is "
               "retried, then recomputed or failed, never used (default off)")
    g.add_argument("--kv-transfer-layers-per-group", type=int, default=None,
                   help="layers per KV send while prefill computes the rest (default 1)")


_NOT_CONFIG = {"model_tag", "config", "command", "func"}


def config_from_args(args: argparse.Namespace):
    from serving.config import Config
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in _NOT_CONFIG}
    if getattr(args, "model_tag", None) and "model" not in overrides:
        overrides["model"] = args.model_tag
    per_role = {role: overrides.pop(f"{role}_tp") for role in ("prefill", "decode") if f"{role}_tp" in overrides}
    config = Config.load(args.config, overrides)
    for role, tp in per_role.items():  # the same key the YAML's role sections (and the planner) write
        merged = {**getattr(config.deploy, f"{role}_overrides"), "tensor_parallel_size": tp}
        config = config.replace(**{f"{role}_overrides": merged})
    return config


def run_serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    logging.basicConfig(level=config.server.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from serving.api.server import run_server
    from serving.launch import build_engine_client
    engine = build_engine_client(config)
    asyncio.run(run_server(engine, config.server))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # bench/profile/make-model/simulate/plan own their flags: hand them the rest of the line
    if argv and argv[0] in _SUBCOMMANDS:
        return _SUBCOMMANDS[argv[0]]()(argv[1:])
    parser = argparse.ArgumentParser(prog="pdserve", description="LLM serving with disaggregated "
                                     "prefill and decode")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the OpenAI-compatible server")
    add_serve_args(serve)
    for name, help in (("make-model", "write a random-weight test model"),
                       ("bench", "load-generator benchmarks against an OpenAI endpoint"),
                       ("profile", "profile step latency and fit the latency model"),
                       ("simulate", "simulate a deployment on a workload (bench's report, no server)"),
                       ("plan", "choose a deployment (phases' parallelism, instance counts) for SLOs")):
        sub.add_parser(name, help=help, add_help=False)
    args = parser.parse_args(argv)
    try:
        return run_serve(args)
    except ValueError as e:  # configuration errors: say what to change, no traceback
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def _make_model_main():
    from serving.models.make_model import main as make_model_main
    return make_model_main


def _bench_main():
    from bench.cli import main as bench_main
    return bench_main


def _profile_main():
    from bench.profile import main as profile_main
    return profile_main


def _simulate_main():
    from bench.simulate import main as simulate_main
    return simulate_main


def _plan_main():
    from bench.plan import main as plan_main
    return plan_main


_SUBCOMMANDS = {"make-model": _make_model_main, "bench": _bench_main, "profile": _profile_main,
                "simulate": _simulate_main, "plan": _plan_main}

if __name__ == "__main__":
    sys.exit(main())
