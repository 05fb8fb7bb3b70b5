"""`python -m bench.soak`: a long mixed load with random aborts against a deployment, watching for
leaks. Every process's RSS and open file descriptors are sampled over time (they should stay flat),
the KV blocks each instance still holds once the load has drained are counted (they should be 0), and
every request's outcome is tallied (finished by reason, aborted by the client, errors by kind).

    python -m bench.soak --model DIR                    # starts `pdserve serve` 2P2D; 10,000 requests
    python -m bench.soak --model DIR --num-requests 200 --concurrency 16
    python -m bench.soak --base-url URL --server-pid PID   # a server that is already running

The load: completions and chats, streamed or not, random prompt and output lengths, some with n=2;
a fraction of the clients go away at a random moment. Writes `<name>.json` and `<name>.png` (RSS and
FDs over time) to --result-dir.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from bench.client import StreamingClient
from bench.config import EndpointConfig
from bench.plots import plot_process_series
from bench.processes import ProcessSampler, summarize
from bench.prompts import PromptSynthesizer
from bench.records import RequestRecord
from bench.report import write_json
from bench.session import resolve_served_model
from bench.systems import RunningSystem, SystemSpec

_ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
_NUM_ERROR_EXAMPLES = 3
_HELP = {
    "num_requests": "requests to send", "concurrency": "requests in flight at once",
    "abort_fraction": "fraction of clients that go away at a random moment",
    "max_abort_delay_s": "those go away uniformly within this many seconds of sending",
    "stream_fraction": "fraction of streamed requests", "chat_fraction": "fraction of chat completions",
    "n2_fraction": "fraction of requests with n=2", "max_prompt_tokens": "prompt lengths uniform in [4, this]",
    "max_output_tokens": "max_tokens uniform in [1, this]", "request_timeout_s": "seconds per request",
    "sample_interval_s": "seconds between RSS/FD samples",
    "drain_timeout_s": "seconds to wait, once the load is over, for every KV block to be free again",
    "seed": "seed of the load (same seed, same requests)",
}


@dataclass(frozen=True)
class SoakConfig:
    num_requests: int = 10_000
    concurrency: int = 32
    abort_fraction: float = 0.2  # clients that go away at a random moment
    max_abort_delay_s: float = 2.0
    stream_fraction: float = 0.7
    chat_fraction: float = 0.5
    n2_fraction: float = 0.1  # requests with n=2
    max_prompt_tokens: int = 256
    max_output_tokens: int = 64
    request_timeout_s: float = 300.0
    sample_interval_s: float = 2.0
    drain_timeout_s: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.concurrency < 1:
            raise ValueError("--num-requests and --concurrency must be at least 1")
        for name in ("abort_fraction", "stream_fraction", "chat_fraction", "n2_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.max_prompt_tokens < 4 or self.max_output_tokens < 1:
            raise ValueError("--max-prompt-tokens must be at least 4 and --max-output-tokens at least 1")
        if min(self.max_abort_delay_s, self.request_timeout_s, self.sample_interval_s, self.drain_timeout_s) <= 0:
            raise ValueError("--max-abort-delay, --request-timeout, --sample-interval and --drain-timeout "
                             "must be positive")


@dataclass(frozen=True)
class SoakRequest:
    kind: str  # "completions" or "chat"
    payload: dict
    abort_after_s: float | None  # the client goes away this long after sending


def make_requests(config: SoakConfig, model: str) -> list[SoakRequest]:
    """The whole load, drawn from config.seed (same seed, same load)."""
    rng = np.random.default_rng(config.seed)
    words = PromptSynthesizer(None)  # words of about one token each: no tokenizer needed
    requests = []
    for _ in range(config.num_requests):
        text, _ = words.text(int(rng.integers(4, config.max_prompt_tokens + 1)), rng)
        payload = {"model": model, "max_tokens": int(rng.integers(1, config.max_output_tokens + 1)),
                   "n": 2 if rng.random() < config.n2_fraction else 1}
        if rng.random() < config.chat_fraction:
            kind, payload["messages"] = "chat", [{"role": "user", "content": text}]
        else:
            kind, payload["prompt"] = "completions", text
        payload["stream"] = bool(rng.random() < config.stream_fraction)
        if payload["stream"]:
            payload["stream_options"] = {"include_usage": True}
        abort_after_s = float(rng.uniform(0, config.max_abort_delay_s))
        requests.append(SoakRequest(kind, payload, abort_after_s if rng.random() < config.abort_fraction else None))
    return requests


def outcome(record: RequestRecord, aborted: bool) -> tuple[str, str]:
    """("finished", reason) | ("aborted", "client") | ("error", kind)."""
    if aborted:
        return "aborted", "client"
    reasons = "+".join(sorted(set(record.finish_reasons))) or "unknown"
    if record.success:
        return "finished", reasons
    if record.http_status == 200 and record.finish_reasons and not record.generated_text:
        # a reply that finished with no text at all (say, end of sequence as its first token): the
        # benchmark cannot time it, but nothing went wrong
        return "finished", f"{reasons} (empty text)"
    if record.http_status not in (None, 200):
        return "error", f"http_{record.http_status}"
    if record.http_status == 200:
        return "error", "error_in_stream"
    if record.error.startswith("no complete reply"):
        return "error", "timeout"
    return "error", record.error.split(":", 1)[0] or "unknown"  # the transport error's type


async def run_load(base_url: str, requests: list[SoakRequest], config: SoakConfig, api_key: str | None,
                   show_progress: bool) -> tuple[dict, float]:
    """Send every request (at most config.concurrency at once); returns the outcome tally and the
    duration."""
    counts: Counter = Counter()
    examples: dict[str, list[str]] = {}
    slots = asyncio.Semaphore(config.concurrency)
    progress = tqdm(total=len(requests), disable=not show_progress, unit="req", desc="soak", dynamic_ncols=True)
    clients = {kind: StreamingClient(EndpointConfig(base_url=base_url, endpoint=path, api_key=api_key,
                                                    request_timeout_s=config.request_timeout_s))
               for kind, path in _ENDPOINTS.items()}
    origin_s = time.perf_counter()

    async def one(index: int, request: SoakRequest) -> None:
        async with slots:
            record = RequestRecord(f"soak-{index}")
            task = asyncio.ensure_future(clients[request.kind].send(request.payload, record, origin_s))
            done, _ = await asyncio.wait({task}, timeout=request.abort_after_s)
            if not done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            group, key = outcome(record, aborted=not done)
        counts[(group, key)] += 1
        if group == "error" and len(examples.setdefault(key, [])) < _NUM_ERROR_EXAMPLES:
            examples[key].append(record.error)
        progress.update(1)

    try:
        async with contextlib.AsyncExitStack() as stack:
            for client in clients.values():
                await stack.enter_async_context(client)
            await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    finally:
        progress.close()
    tally = {"finished": {k: n for (g, k), n in sorted(counts.items()) if g == "finished"},
             "aborted": counts[("aborted", "client")],
             "errors": {k: n for (g, k), n in sorted(counts.items()) if g == "error"},
             "error_examples": examples}
    return tally, time.perf_counter() - origin_s


def blocks_after_drain(base_url: str, timeout_s: float, api_key: str | None) -> tuple[dict, bool]:
    """Per instance, its KV blocks as /metrics reports them once every block is free again (or at the
    deadline): ({instance: {num_free_blocks, num_total_blocks, num_leaked_blocks, up}}, drained).
    A colocated server has no per-instance gauges: its KV usage fraction is reported instead."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=30.0, headers=headers) as http:
        while True:
            gauges: dict[str, dict[str, float]] = {}
            for family in text_string_to_metric_families(http.get(base_url.rstrip("/") + "/metrics").text):
                for sample in family.samples:
                    instance = sample.labels.get("instance", "server")
                    gauges.setdefault(instance, {})[sample.name.removeprefix("pdserve:")] = sample.value
            blocks = {name: _blocks(values) for name, values in gauges.items()
                      if "instance_num_total_blocks" in values}
            if not blocks:  # colocated: no instances
                blocks = {"server": _blocks(gauges.get("server", {}))}
            drained = all(b.get("num_leaked_blocks", 0) == 0 and b.get("kv_cache_usage", 0) == 0
                          for b in blocks.values())
            if drained or time.monotonic() > deadline:
                return blocks, drained
            time.sleep(1.0)


def _blocks(values: dict[str, float]) -> dict:
    if "instance_num_total_blocks" not in values:
        return {"kv_cache_usage": values.get("kv_cache_usage_perc", 0.0)}
    free, total = int(values["instance_num_free_blocks"]), int(values["instance_num_total_blocks"])
    return {"num_free_blocks": free, "num_total_blocks": total, "num_leaked_blocks": total - free,
            "up": int(values.get("instance_up", 1))}


def soak(base_url: str, server_pid: int | None, config: SoakConfig, api_key: str | None = None,
         show_progress: bool = True) -> dict:
    """Run the load against base_url, sampling server_pid's processes; returns the report."""
    model, _ = resolve_served_model(base_url, api_key, None)
    requests = make_requests(config, model)
    sampler = ProcessSampler(server_pid, config.sample_interval_s).start() if server_pid else None
    try:
        tally, duration_s = asyncio.run(run_load(base_url, requests, config, api_key, show_progress))
        blocks, drained = blocks_after_drain(base_url, config.drain_timeout_s, api_key)
    finally:
        if sampler is not None:
            sampler.stop()
    processes = {name: summarize(samples) for name, samples in (sampler.series if sampler else {}).items()}
    return {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "base_url": base_url, "model": model,
            "config": asdict(config), "num_requests": len(requests), "duration_s": duration_s,
            "outcomes": tally, "processes": processes, "blocks": blocks, "drained": drained,
            "num_blocks_leaked": sum(b.get("num_leaked_blocks", 0) for b in blocks.values())}


def format_summary(report: dict) -> str:
    tally = report["outcomes"]
    lines = [f"{report['num_requests']} requests in {report['duration_s']:.0f} s: finished {tally['finished']}, "
             f"aborted {tally['aborted']}, errors {tally['errors'] or 'none'}"]
    for name, process in sorted(report["processes"].items()):
        rss, fds = process["rss_bytes"], process["num_fds"]
        lines.append(f"  {name:<12} RSS {rss['start'] / 2**20:7.1f} -> {rss['end'] / 2**20:7.1f} MiB "
                     f"(max {rss['max'] / 2**20:.1f}, second half {rss['late_slope_per_hour'] / 2**20:+.1f} MiB/h); "
                     f"FDs {fds['start']} -> {fds['end']} (max {fds['max']}, second half "
                     f"{fds['late_slope_per_hour']:+.1f}/h)"
                     + (f"; restarted (pids {process['pids']})" if len(process["pids"]) > 1 else ""))
    lines.append(f"  KV blocks leaked: {report['num_blocks_leaked']}"
                 + ("" if report["drained"] else " (not drained within --drain-timeout)") + f" {report['blocks']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    target = parser.add_argument_group("server (started here unless --base-url is given)")
    target.add_argument("--base-url", default=None, help="a running server; sample its processes with --server-pid")
    target.add_argument("--server-pid", type=int, default=None, help="pid of that server's API process")
    target.add_argument("--model", default=None, help="model directory to serve (needed to start a server)")
    target.add_argument("--mode", default="disaggregated", choices=["colocated", "disaggregated"],
                        help="placement mode of the server started here")
    target.add_argument("--num-prefill", type=int, default=2, help="its prefill instances")
    target.add_argument("--num-decode", type=int, default=2, help="its decode instances")
    target.add_argument("--serve-arg", action="append", default=[],
                        help="extra `pdserve serve` argument (repeat it), e.g. --serve-arg=--max-num-seqs=64")
    target.add_argument("--api-key", default=None, help="bearer token the server requires")
    load = parser.add_argument_group("load")
    for name, value in asdict(SoakConfig()).items():
        flag = "--" + name.replace("_", "-").removesuffix("-s")  # seconds: --request-timeout
        load.add_argument(flag, dest=name, type=type(value), default=value, help=_HELP[name],
                          metavar=flag[2:].upper().replace("-", "_"))
    out = parser.add_argument_group("output")
    out.add_argument("--result-dir", default="results", help="where the .json, .png and server log go")
    out.add_argument("--result-filename", default=None, help="stem of the .json and .png (None: soak-DATE)")
    out.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = SoakConfig(**{name: getattr(args, name) for name in asdict(SoakConfig())})
        if args.base_url is None and args.model is None:
            raise ValueError("pass --model DIR to start a server (make one with `pdserve make-model --size "
                             "tiny --out DIR`), or --base-url URL for a running one")
    except ValueError as exc:
        print(f"soak: error: {exc}", file=sys.stderr)
        return 2
    result_dir = Path(args.result_dir)
    stem = args.result_filename or f"soak-{datetime.now():%Y%m%d-%H%M%S}"
    with contextlib.ExitStack() as stack:
        base_url, server_pid = args.base_url, args.server_pid
        if base_url is None:
            spec = SystemSpec("pdserve-soak", "pdserve", model=args.model, mode=args.mode,
                              num_prefill=args.num_prefill, num_decode=args.num_decode,
                              extra_args=tuple(args.serve_arg))
            running = RunningSystem(spec, result_dir)
            base_url = stack.enter_context(running)
            server_pid = running.process.pid
        report = soak(base_url, server_pid, config, args.api_key, not args.disable_tqdm)
    series = {name: p["samples"] for name, p in report["processes"].items()}
    json_path = write_json(result_dir / f"{stem}.json", report)
    print(format_summary(report))
    print(f"result: {json_path}")
    if series:
        print(f"plot: {plot_process_series(series, result_dir / f'{stem}.png')}")
    return 0 if report["drained"] else 1


if __name__ == "__main__":
    sys.exit(main())
