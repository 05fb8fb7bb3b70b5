"""A benchmark session: one endpoint, one workload, run at one or more rates or searched for goodput.

Shared by `pdserve bench serve`, `goodput` and `compare`, so the three measure in exactly one way.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench.aiperf import AIPerfClient
from bench.client import list_models
from bench.config import EndpointConfig, LoadConfig
from bench.datasets import Workload
from bench.goodput import GoodputSearch, search_goodput
from bench.metrics import LATENCY_METRICS
from bench.prompts import PromptSynthesizer, load_tokenizer
from bench.report import format_result_table, run_result_dict
from bench.runner import RunSpec, check_ready, run_benchmark


def scrape_counters(endpoint: EndpointConfig) -> dict[str, float] | None:
    """Every counter the server's /metrics exposes ("name_total{labels}" -> value; pdserve's and vLLM's
    alike), or None where there is none to read."""
    if not endpoint.base_url:
        return None
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
    try:
        response = httpx.get(endpoint.base_url.rstrip("/") + "/metrics", headers=headers, timeout=30)
        response.raise_for_status()
        families = list(text_string_to_metric_families(response.text))
    except (httpx.HTTPError, ValueError):
        return None
    counters = {}
    for family in families:
        if family.type != "counter":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                counters[sample.name + (f"{{{labels}}}" if labels else "")] = float(sample.value)
    return counters


def counter_total(counters: dict[str, float], name: str) -> float:
    """A counter of `scrape_counters` (or its run's change), summed over its label sets."""
    return sum(value for key, value in counters.items() if key == name or key.startswith(name + "{"))


@dataclass(frozen=True)
class OutputOptions:
    result_dir: Path = Path("results")
    save_result: bool = False
    result_filename: str | None = None
    save_detailed: bool = False
    label: str | None = None
    percentile_metrics: tuple[str, ...] = LATENCY_METRICS
    show_progress: bool = True


def resolve_served_model(base_url: str, api_key: str | None, requested: str | None) -> tuple[str, str | None]:
    """(name to put in requests, the server's `root` for it). `requested` may be a served name or the
    model directory the server was started with."""
    try:
        models = asyncio.run(list_models(base_url, api_key))
    except ValueError:
        if requested is None:
            raise
        return requested, None  # a server without /v1/models: trust the name we were given
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no model; is the server still loading?")
    ids = [str(m.get("id")) for m in models]
    if requested is None:
        return ids[0], models[0].get("root")
    for entry in models:
        root = entry.get("root")
        if requested in (entry.get("id"), root) or Path(requested).name == entry.get("id"):
            return str(entry["id"]), root
    if len(models) == 1 and Path(requested).is_dir():
        return ids[0], models[0].get("root")  # served under another name; the directory is still ours
    raise ValueError(f"the server serves {', '.join(ids)}, not {requested!r}; pass --served-model-name")


def resolve_synthesizer(tokenizer_arg: str | None, model: str | None,
                        server_root: str | None) -> tuple[PromptSynthesizer, str | None]:
    """The prompt synthesizer and the tokenizer it uses (--tokenizer, else a local --model directory,
    else the directory the server reports; `--tokenizer none` forces approximate word prompts)."""
    if tokenizer_arg == "none":
        return PromptSynthesizer(None), None
    candidates = [tokenizer_arg] if tokenizer_arg else [p for p in (model, server_root)
                                                        if p and Path(p).is_dir()]
    if not candidates:
        print("note: no tokenizer found (pass --tokenizer DIR); prompts are words of about one token "
              "each and token counts come from the server's usage reports")
        return PromptSynthesizer(None), None
    return PromptSynthesizer(load_tokenizer(candidates[0])), candidates[0]


@dataclass
class BenchSession:
    endpoint: EndpointConfig
    model: str
    workload: Workload
    load: LoadConfig  # request_rate is replaced per run
    slos_ms: dict[str, float]
    percentiles: tuple[float, ...]
    synthesizer: PromptSynthesizer
    info: dict[str, Any] = field(default_factory=dict)
    output: OutputOptions = field(default_factory=OutputOptions)
    seed: int = 0
    client: AIPerfClient | None = None  # None: pdserve's own client (bench/runner.py)

    def check_ready(self) -> None:
        check_ready(self.endpoint, self.model, self.workload)

    def run_at(self, rate: float) -> dict[str, Any]:
        """One run at `rate`; prints vLLM's table and returns the result dict."""
        load = dataclasses.replace(self.load, request_rate=rate)
        self._print_header(load)
        spec = RunSpec(self.endpoint, self.model, load, self.slos_ms, self.percentiles, self.seed,
                       self.output.show_progress)
        count_tokens = self.synthesizer.count_tokens if self.synthesizer.tokenizer is not None else None
        before = scrape_counters(self.endpoint)
        run = (self.client.run(spec, self.info.get("label") or "run") if self.client is not None
               else run_benchmark(spec, self.workload, count_tokens))
        result = run_result_dict(run, self.info, self.output.save_detailed)
        after = scrape_counters(self.endpoint)
        if before is not None and after is not None:  # what the server counted during the run
            result["server_counters"] = {name: after[name] - before.get(name, 0.0) for name in sorted(after)
                                         if after[name] != before.get(name, 0.0)}
            result["num_preemptions"] = round(counter_total(result["server_counters"], "pdserve:num_preemptions_total")
                                              + counter_total(result["server_counters"], "vllm:num_preemptions_total"))
        print(format_result_table(result, self.output.percentile_metrics), flush=True)
        return result

    def sweep(self, rates: list[float]) -> list[dict[str, Any]]:
        return [self.run_at(rate) for rate in rates]

    def search(self, rate_low: float, rate_high: float, target: float, rel_tol: float, max_probes: int,
               num_devices: int, run_at: Callable[[float], dict[str, Any]] | None = None
               ) -> tuple[GoodputSearch, list[dict[str, Any]]]:
        """run_at: how one probe runs (default self.run_at; compare's adds the cores the server used)."""
        run_at = run_at or self.run_at
        if not self.slos_ms:
            raise ValueError("a goodput search needs SLOs: pass e.g. --goodput ttft:500 tpot:100")
        results: list[dict[str, Any]] = []

        def measure(rate: float) -> float:
            results.append(run_at(rate))
            attainment = results[-1]["slo_attainment"]
            print(f"probe: rate {rate:.3f} req/s -> SLO attainment {100 * attainment:.1f}%", flush=True)
            return attainment

        search = search_goodput(measure, rate_low, rate_high, target, rel_tol, max_probes, num_devices)
        return search, results

    def _print_header(self, load: LoadConfig) -> None:
        if load.arrival == "trace":
            print(f"Replaying trace timestamps (x{load.trace_time_scale:g})")
        else:
            process = {"poisson": "Poisson process", "gamma": "Gamma distribution",
                       "constant": "constant gaps"}[load.arrival]
            print(f"Traffic request rate: {load.request_rate if not math.isinf(load.request_rate) else 'inf'}")
            print(f"Burstiness factor: {load.burstiness} ({process})")
        print(f"Maximum request concurrency: {load.max_concurrency}", flush=True)
