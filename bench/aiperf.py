"""NVIDIA AIPerf as the load generator of a `pdserve bench` run (`--client aiperf`): an independent client
to cross-check what pdserve's own client measures (docs/benchmarks.md, "Cross-check with AIPerf").

AIPerf is not a dependency: install it into an environment of its own (it pins its own packages),

    python -m venv .venv-aiperf && .venv-aiperf/bin/pip install aiperf      # 0.13 measured here

and `--client aiperf` finds `.venv-aiperf/bin/aiperf` (or `aiperf` on PATH, or `--aiperf PATH`). Each
run becomes one `aiperf profile` of the same shape as the workload flags (random prompts of
--random-input-len ± --random-range-ratio tokens, --output-len or --random-output-len output tokens,
the same arrival process, rate, request count and seed; AIPerf draws its own prompts and arrival times
from them). Its per-request records (`profile_export.jsonl`) become the benchmark's own RequestRecords,
so TTFT, TPOT, ITL, SLO attainment, goodput searches, side-by-side tables and plots are computed by
the same code as for the built-in client; AIPerf's artifacts are kept under
RESULT_DIR/aiperf/<label>-<rate>qps/.

Field by field: TTFT = `time_to_first_token`; the gaps between token chunks = `inter_chunk_latency`;
end-to-end latency = `request_latency`; output tokens = `output_sequence_length` (the server's usage
count, `--use-server-token-count`); prompt tokens = `input_sequence_length`; a record with an
`error`, or cancelled, is a failed request. TPOT is then vLLM's, (latency - TTFT) / (tokens - 1),
which is what AIPerf calls `inter_token_latency`.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.config import WorkloadConfig
from bench.dataset_files import json_lines
from bench.metrics import compute_metrics
from bench.records import RequestRecord
from bench.runner import RunResult, RunSpec

EXPORT = "profile_export.jsonl"
SUMMARY = "profile_export_aiperf.json"
_ARRIVALS = ("poisson", "constant")  # AIPerf's --arrival-pattern names them alike


def find_aiperf(given: str | None) -> str:
    """`--aiperf PATH`, else .venv-aiperf/bin/aiperf here, else `aiperf` on PATH; ValueError says how to
    install it."""
    if given:
        if not Path(given).is_file():
            raise ValueError(f"--aiperf: {given} is not a file; give the aiperf executable")
        return given
    local = Path(".venv-aiperf/bin/aiperf")
    if local.is_file():
        return str(local)
    found = shutil.which("aiperf")
    if found:
        return found
    raise ValueError("--client aiperf: AIPerf is not installed. Install it into an environment of its own: "
                     "python -m venv .venv-aiperf && .venv-aiperf/bin/pip install aiperf (or pass --aiperf PATH)")


def check_aiperf(workload: WorkloadConfig, arrival: str, api_key: str | None) -> None:
    """What AIPerf can send of a pdserve workload; ValueError names the flag to change."""
    if workload.dataset_name != "random":
        raise ValueError(f"--client aiperf sends random prompts only; use --dataset-name random (got "
                         f"{workload.dataset_name!r})")
    if workload.num_turns != 1 or workload.tenants or workload.priority_levels:
        raise ValueError("--client aiperf sends single-turn requests of one tenant: drop --num-turns, --tenants "
                         "and --priority-levels")
    if workload.prompt_format != "text":
        raise ValueError("--client aiperf sends text prompts: drop --prompt-format token_ids")
    if arrival not in _ARRIVALS:
        raise ValueError(f"--client aiperf: --arrival {arrival} is not supported; use "
                         f"{' or '.join(_ARRIVALS)}")
    if workload.max_model_len is not None:
        # pdserve's own client shortens a prompt that would not fit (bench/datasets.py); AIPerf cannot be told
        longest = longest_request(workload)
        if sum(longest) > workload.max_model_len:
            raise ValueError(
                f"--client aiperf cannot shorten prompts to fit --max-model-len {workload.max_model_len}: its longest "
                f"request would be {longest[0]} prompt + {longest[1]} output tokens; lower --random-input-len, "
                "--random-output-len or --random-range-ratio, or raise --max-model-len")
    if api_key:
        raise ValueError("--client aiperf would put the API key on AIPerf's command line, where other users "
                         "of the machine can read it; benchmark a server started without an API key, or "
                         "use the built-in client")


def output_shape(workload: WorkloadConfig) -> tuple[int, float]:
    """(output length, its range ratio) as AIPerf is told them: a fixed --output-len has no spread."""
    if workload.output_len is not None:
        return workload.output_len, 0.0
    return workload.random_output_len, workload.random_range_ratio


def longest_request(workload: WorkloadConfig) -> tuple[int, int]:
    """(prompt, output) tokens of the longest request AIPerf draws: the lengths times (1 + range ratio),
    (rounded up) as AIPerf's --random-range-ratio spreads them, like vLLM's random dataset."""
    output_len, output_ratio = output_shape(workload)
    return (math.ceil(workload.random_input_len * (1 + workload.random_range_ratio)),
            math.ceil(output_len * (1 + output_ratio)))


@dataclass(frozen=True)
class AIPerfClient:
    """Runs each benchmark run through `aiperf profile` (module doc)."""
    executable: str
    workload: WorkloadConfig
    tokenizer: str          # a local model or tokenizer directory
    artifact_root: Path     # one directory per run under it

    def command(self, spec: RunSpec, artifact_dir: Path) -> list[str]:
        workload, load, endpoint = self.workload, spec.load, spec.endpoint
        output_len, output_ratio = output_shape(workload)
        argv = [self.executable, "profile", "--model", spec.model, "--url", endpoint.base_url.rstrip("/"),
                "--endpoint-type", "chat" if endpoint.is_chat else "completions", "--streaming",
                "--tokenizer", self.tokenizer, "--isl", str(workload.random_input_len), "--osl", str(output_len),
                "--random-range-ratio", json.dumps({"input": workload.random_range_ratio, "output": output_ratio}),
                "--use-legacy-max-tokens", "--use-server-token-count",
                "--request-count", str(workload.num_prompts), "--num-dataset-entries", str(workload.num_prompts),
                "--random-seed", str(spec.seed), "--request-timeout-seconds", str(endpoint.request_timeout_s),
                "--artifact-dir", str(artifact_dir), "--ui", "none", "--workers-max", "1",
                "--record-processors", "1", "--no-server-metrics", "--no-auto-plot"]
        if not math.isinf(load.request_rate):
            argv += ["--request-rate", f"{load.request_rate:g}", "--arrival-pattern", load.arrival]
        if load.max_concurrency:
            argv += ["--concurrency", str(load.max_concurrency)]
        elif math.isinf(load.request_rate):
            argv += ["--concurrency", str(workload.num_prompts)]  # all at once
        extra = {**endpoint.extra_body}
        if endpoint.ignore_eos:
            extra["ignore_eos"] = True
        if endpoint.temperature is not None:
            extra["temperature"] = endpoint.temperature
        for key, value in extra.items():
            argv += ["--extra-inputs", f"{key}:{json.dumps(value) if not isinstance(value, str) else value}"]
        return argv

    def run(self, spec: RunSpec, label: str) -> RunResult:
        artifact_dir = self.artifact_root / f"{label}-{spec.load.request_rate:g}qps"  # inf: "inf"
        if artifact_dir.exists():
            shutil.rmtree(artifact_dir)
        artifact_dir.mkdir(parents=True)
        argv = self.command(spec, artifact_dir)
        print(f"aiperf: {' '.join(argv)}", flush=True)
        started_at = time.time()
        with open(artifact_dir / "aiperf-stdout.txt", "w") as log:
            code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        if not (artifact_dir / EXPORT).is_file():
            tail = (artifact_dir / "aiperf-stdout.txt").read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"aiperf profile exited with status {code} and wrote no {EXPORT} (its output: "
                               f"{artifact_dir / 'aiperf-stdout.txt'}):\n" + "\n".join(tail))
        if code != 0:  # it does when requests failed; they are in the records as failures
            print(f"aiperf: exited with status {code}; its output: {artifact_dir / 'aiperf-stdout.txt'}", flush=True)
        records = read_records(artifact_dir / EXPORT)
        duration_s = benchmark_duration_s(artifact_dir / SUMMARY, records)
        metrics = compute_metrics(records, duration_s, list(spec.percentiles), spec.slos_ms, {})
        return RunResult(spec, records, duration_s, metrics, started_at)


def _value(metrics: dict, name: str, default: float | list | None = None):
    entry = metrics.get(name)
    return default if entry is None else entry.get("value", default)


def read_records(path: Path) -> list[RequestRecord]:
    """AIPerf's per-request records of its profiling phase as RequestRecords (times in seconds after the
    first request was released)."""
    rows = [row for _, row in json_lines(path.read_text().splitlines(), path)
            if row.get("metadata", {}).get("benchmark_phase", "profiling") == "profiling"]
    if not rows:
        raise ValueError(f"{path}: no records of the profiling phase")
    origin_ns = min(row["metadata"].get("credit_issued_ns") or row["metadata"]["request_start_ns"] for row in rows)
    records = []
    for index, row in enumerate(sorted(rows, key=lambda r: r["metadata"]["request_start_ns"])):
        meta, metrics, error = row["metadata"], row.get("metrics") or {}, row.get("error")
        start_ns = meta["request_start_ns"]
        success = not error and not meta.get("was_cancelled") and "time_to_first_token" in metrics
        record = RequestRecord(
            request_id=meta.get("x_request_id") or f"aiperf-{index}",
            num_prompt_tokens=int(_value(metrics, "input_sequence_length", _value(metrics, "error_isl", 0))),
            num_output_tokens=int(_value(metrics, "output_sequence_length", 0)) if success else 0,
            arrival_s=((meta.get("credit_issued_ns") or start_ns) - origin_ns) / 1e9,
            start_s=(start_ns - origin_ns) / 1e9, success=success)
        if success:
            record.ttft_s = _value(metrics, "time_to_first_token") / 1e3
            record.itl_s = [gap / 1e3 for gap in _value(metrics, "inter_chunk_latency", [])]
            record.e2el_s = _value(metrics, "request_latency") / 1e3
        else:
            record.error = (json.dumps(error) if error else "cancelled" if meta.get("was_cancelled")
                            else "no first token recorded")
            if isinstance(error, dict) and isinstance(error.get("code"), int):
                record.http_status = error["code"]
        records.append(record)
    return records


def benchmark_duration_s(summary: Path, records: list[RequestRecord]) -> float:
    """AIPerf's own benchmark duration, else first release to last response."""
    if summary.is_file():
        duration = json.loads(summary.read_text()).get("benchmark_duration", {}).get("avg")
        if duration:
            return float(duration)
    ends = [r.start_s + r.e2el_s for r in records if r.success] or [r.start_s for r in records]
    return max(max(ends), 1e-9)

