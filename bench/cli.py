"""`pdserve bench {serve,goodput,compare}`: load generation and serving benchmarks over HTTP.

    pdserve bench serve   --base-url URL [--request-rate 1,2,4] [--goodput ttft:500 tpot:100] ...
    pdserve bench goodput --base-url URL --goodput ttft:500 tpot:100 [--target-attainment 0.9] ...
    pdserve bench compare --model DIR --systems pdserve-colocated,pdserve-disaggregated,vllm ...

Flags mean what they mean in `vllm bench serve` where that has them. Also `python -m bench.cli`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.aiperf import AIPerfClient, check_aiperf, find_aiperf
from bench.cli_args import add_common_args, add_compare_args, add_search_args
from bench.config import EndpointConfig, LoadConfig, WorkloadConfig, parse_slos, parse_tenants
from bench.datasets import build_workload
from bench.metrics import LATENCY_METRICS
from bench.plots import cdf_samples, plot_attainment, plot_latency_cdfs
from bench.report import rate_from_json, result_stem, write_json
from bench.session import BenchSession, OutputOptions, resolve_served_model, resolve_synthesizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve bench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the workload at one or more request rates")
    add_common_args(serve, needs_base_url=True)
    goodput = commands.add_parser("goodput", help="bisect the highest rate meeting the SLO attainment")
    add_common_args(goodput, needs_base_url=True)
    add_search_args(goodput)
    compare = commands.add_parser("compare", help="start each system in turn and benchmark them all")
    add_common_args(compare, needs_base_url=False)
    add_compare_args(compare)
    add_search_args(compare, devices_flag=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed its message; hand the code back
        return int(exit_.code or 0)
    try:
        options = _Options.from_args(args)
    except ValueError as exc:
        print(f"pdserve bench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return {"serve": _serve, "goodput": _goodput, "compare": _compare}[args.command](args, options)
    except (ValueError, RuntimeError) as exc:
        print(f"pdserve bench {args.command}: error: {exc}", file=sys.stderr)
        return 1


@dataclass(frozen=True)
class _Options:
    """The validated configs of one invocation (flag errors surface here, before any request)."""
    endpoint: EndpointConfig
    workload: WorkloadConfig
    load: LoadConfig
    slos_ms: dict[str, float]
    rates: list[float]
    percentiles: tuple[float, ...]
    output: OutputOptions

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "_Options":
        rates = _parse_list(args.request_rate, "--request-rate", float)
        arrival = args.arrival or ("poisson" if args.burstiness == 1.0 else "gamma")
        endpoint = EndpointConfig(
            base_url=args.base_url or "", endpoint=args.endpoint, model=args.model,
            api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
            request_timeout_s=args.request_timeout, ignore_eos=args.ignore_eos,
            temperature=args.temperature, extra_body=_parse_json(args.extra_body, "--extra-body"))
        workload = WorkloadConfig(
            dataset_name=args.dataset_name, dataset_path=args.dataset_path, num_prompts=args.num_prompts,
            random_input_len=args.random_input_len, random_output_len=args.random_output_len,
            random_range_ratio=args.random_range_ratio, output_len=args.output_len,
            num_turns=args.num_turns, think_time_s=args.think_time, tenants=parse_tenants(args.tenants),
            prompt_format=args.prompt_format, priority_levels=args.priority_levels,
            max_model_len=args.max_model_len, seed=args.seed)
        load = LoadConfig(request_rate=rates[0], arrival=arrival, burstiness=args.burstiness,
                          max_concurrency=args.max_concurrency, trace_time_scale=args.trace_time_scale)
        for rate in rates:
            LoadConfig(request_rate=rate, arrival=arrival, burstiness=args.burstiness)
        if workload.prompt_format == "token_ids" and endpoint.is_chat:
            raise ValueError("--prompt-format token_ids works with --endpoint /v1/completions only")
        metrics = tuple(_parse_list(args.percentile_metrics, "--percentile-metrics", str))
        unknown = [m for m in metrics if m not in LATENCY_METRICS]
        if unknown:
            raise ValueError(f"--percentile-metrics: unknown {', '.join(unknown)}; "
                             f"use some of {','.join(LATENCY_METRICS)}")
        percentiles = tuple(_parse_list(args.metric_percentiles, "--metric-percentiles", float))
        if any(not 0 < p < 100 for p in percentiles):
            raise ValueError("--metric-percentiles must be between 0 and 100 (exclusive), e.g. 90,99")
        output = OutputOptions(result_dir=Path(args.result_dir), save_result=args.save_result,
                               result_filename=args.result_filename, save_detailed=args.save_detailed,
                               label=args.label, percentile_metrics=metrics,
                               show_progress=not args.disable_tqdm)
        return cls(endpoint, workload, load, parse_slos(args.goodput), rates, percentiles, output)


def _parse_list(text: str, flag: str, kind: type) -> list[Any]:
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    try:
        values = [kind(item) for item in items]
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a comma-separated list of {kind.__name__}s") from None
    if not values:
        raise ValueError(f"{flag} needs at least one value")
    return values


def _parse_json(text: str | None, flag: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag}: not valid JSON ({exc.msg}); write e.g. '{{\"top_p\": 0.9}}'") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object")
    return value


def _open_session(args: argparse.Namespace, options: _Options, base_url: str | None) -> BenchSession:
    """Resolve the model and tokenizer, build the workload once, and describe the run."""
    endpoint = options.endpoint
    served, root = (resolve_served_model(base_url, endpoint.api_key, args.served_model_name or args.model)
                    if base_url else (args.model, None))
    synthesizer, tokenizer_id = resolve_synthesizer(args.tokenizer, args.model, root)
    workload = build_workload(options.workload, synthesizer)
    if workload.num_dropped:
        print(f"note: {workload.num_dropped} conversations did not fit --max-model-len "
              f"{options.workload.max_model_len} and were left out")
    info = {
        "label": options.output.label or ("pdserve-bench" if base_url is None else "openai"),
        "backend": "openai-chat" if endpoint.is_chat else "openai", "endpoint": endpoint.endpoint,
        "base_url": endpoint.base_url if base_url else None, "model_id": served,
        "tokenizer_id": tokenizer_id, "dataset_name": options.workload.dataset_name,
        "num_prompts": len(workload.conversations), "num_turns": options.workload.num_turns,
        "prompt_format": options.workload.prompt_format, "ignore_eos": endpoint.ignore_eos,
        "seed": options.workload.seed, "tenant_weights": workload.tenant_weights,
    }
    client = None
    if args.client == "aiperf":
        check_aiperf(options.workload, options.load.arrival, endpoint.api_key)
        if tokenizer_id is None:
            raise ValueError("--client aiperf needs a tokenizer: pass --model DIR or --tokenizer DIR")
        client = AIPerfClient(find_aiperf(args.aiperf), options.workload, tokenizer_id,
                              options.output.result_dir / "aiperf")
        info["client"] = "aiperf"
    return BenchSession(endpoint, served or "", workload, options.load, options.slos_ms,
                        options.percentiles, synthesizer, info, options.output, options.workload.seed, client)


def _result_path(options: _Options, info: dict[str, Any], rate: float, suffix: str, many: bool) -> Path:
    output = options.output
    if output.result_filename:
        name = Path(output.result_filename)
        stem = name.stem + (f"-{rate:g}qps" if many else "")
    else:
        stem = result_stem(info["label"], info["model_id"] or "model", rate, options.load.max_concurrency)
    return output.result_dir / f"{stem}{suffix}"


def _serve(args: argparse.Namespace, options: _Options) -> int:
    session = _open_session(args, options, options.endpoint.base_url)
    session.check_ready()
    results = session.sweep(options.rates)
    if options.output.save_result:
        many = len(results) > 1
        for result in results:
            rate = rate_from_json(result["request_rate"])
            path = write_json(_result_path(options, session.info, rate, ".json", many), result)
            print(f"result: {path}")
        top_rate = max(options.rates)
        plot_base = _result_path(options, session.info, top_rate, "", False)
        cdfs = {f"{rate_from_json(r['request_rate']):g} req/s": cdf_samples(r) for r in results}
        print(f"plot: {plot_latency_cdfs(cdfs, Path(f'{plot_base}-cdf.png'), options.slos_ms)}")
        points = [(rate_from_json(r["request_rate"]), r["slo_attainment"]) for r in results
                  if r["slo_attainment"] is not None and not math.isinf(rate_from_json(r["request_rate"]))]
        if points:
            path = plot_attainment({session.info["label"]: points}, None, Path(f"{plot_base}-attainment.png"))
            print(f"plot: {path}")
    return 0 if all(r["completed"] for r in results) else 1


def _goodput(args: argparse.Namespace, options: _Options) -> int:
    if not options.slos_ms:
        raise ValueError("goodput needs SLOs: pass e.g. --goodput ttft:500 tpot:100")
    session = _open_session(args, options, options.endpoint.base_url)
    session.check_ready()
    search, results = session.search(args.rate_low, args.rate_high, args.target_attainment,
                                     args.rate_tolerance, args.max_probes, args.num_devices)
    bracket = ("no probe failed: it is higher" if search.hit_ceiling
               else f"{search.upper_rate:.3f} req/s failed")
    print(f"Goodput: {search.max_rate:.3f} req/s at SLO attainment >= {100 * search.target:g}% "
          f"({bracket}); {search.rate_per_device:.3f} req/s per device, {search.num_devices} device(s)")
    if options.output.save_result:
        base = _result_path(options, session.info, search.max_rate, "", False)
        path = write_json(Path(f"{base}-goodput.json"), {**session.info, "slos_ms": options.slos_ms,
                                                         "search": search.to_dict(), "runs": results})
        points = [(p.rate, p.attainment) for p in search.probes]
        plot = plot_attainment({session.info["label"]: points}, search.target,
                               Path(f"{base}-goodput-attainment.png"))
        print(f"result: {path}\nplot: {plot}")
    return 0


def _compare(args: argparse.Namespace, options: _Options) -> int:
    from bench.side_by_side import (SearchOptions, format_comparison_table, run_comparison,
                                    write_comparison)
    from bench.systems import load_systems, systems_from_names

    if args.systems_file:
        specs = load_systems(args.systems_file, args.model)
        if args.only:
            wanted = [name.strip() for name in args.only.split(",") if name.strip()]
            unknown = sorted(set(wanted) - {spec.name for spec in specs})
            if unknown:
                raise ValueError(f"--only: {', '.join(unknown)} not in {args.systems_file} (it has "
                                 f"{', '.join(spec.name for spec in specs)})")
            specs = [spec for spec in specs if spec.name in wanted]
    elif args.only:
        raise ValueError("--only picks systems of a --systems-file; without one, name them with --systems")
    else:
        names = [name.strip() for name in args.systems.split(",") if name.strip()]
        specs = systems_from_names(names, args.model, args.vllm_venv, options.workload.max_model_len,
                                   args.url or [])
    if not specs:
        raise ValueError("no system to compare: pass --systems, --url NAME=URL or --systems-file")
    if args.model is None and specs and specs[0].model:
        args.model = specs[0].model  # the tokenizer comes from the shared model directory
    session = _open_session(args, options, None)
    search = (SearchOptions(args.rate_low, args.rate_high, args.target_attainment, args.rate_tolerance,
                            args.max_probes) if args.search_goodput else None)
    if search and not options.slos_ms:
        raise ValueError("--search-goodput needs SLOs: pass e.g. --goodput ttft:500 tpot:100")
    outcomes = run_comparison(specs, session, options.rates, search)
    print(format_comparison_table(outcomes))
    for path in write_comparison(outcomes, options.output.result_dir, options.slos_ms,
                                 search.target if search else None, max(options.rates)):
        print(f"written: {path}")
    failed = [name for name, outcome in outcomes.items() if outcome["error"]]
    if failed:
        print(f"pdserve bench compare: error: {', '.join(failed)} could not be benchmarked; see above",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
