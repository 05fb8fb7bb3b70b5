"""`--client aiperf`: AIPerf's per-request records read as the benchmark's own, its command built from the
workload flags, what it cannot send refused, and a run through BenchSession with a stand-in executable
(AIPerf is an optional extra, not installed in CI). The record files are real AIPerf 0.13 output: six
requests against `pdserve serve` on a tiny model, and two it refused with HTTP 400."""
import json
import math
import stat
import sys
from pathlib import Path

import pytest

from bench.aiperf import AIPerfClient, check_aiperf, find_aiperf, read_records
from bench.config import EndpointConfig, LoadConfig, WorkloadConfig
from bench.datasets import Workload
from bench.metrics import compute_metrics
from bench.prompts import PromptSynthesizer
from bench.runner import RunSpec
from bench.session import BenchSession, OutputOptions

DATA = Path(__file__).parent / "data" / "aiperf"


def test_records_read_as_aiperf_measured_them():
    records = read_records(DATA / "ok-export.jsonl")
    summary = json.loads((DATA / "ok-summary.json").read_text())
    assert len(records) == 6 and all(r.success for r in records)
    assert [r.start_s for r in records] == sorted(r.start_s for r in records)
    assert min(r.arrival_s for r in records) == 0.0 and all(r.start_s >= r.arrival_s for r in records)
    assert all(r.num_output_tokens == 16 and 128 <= r.num_prompt_tokens <= 384 for r in records)
    assert all(r.ttft_s + sum(r.itl_s) == pytest.approx(r.e2el_s, abs=0.02) for r in records)  # chunk gaps
    metrics = compute_metrics(records, summary["benchmark_duration"]["avg"], [90.0], {"ttft": 2000, "tpot": 200},
                              {}).to_dict()
    # the benchmark's own metric code gives AIPerf's own means: TTFT, TPOT (its inter_token_latency), E2EL
    assert metrics["mean_ttft_ms"] == pytest.approx(summary["time_to_first_token"]["avg"], rel=1e-9)
    assert metrics["mean_tpot_ms"] == pytest.approx(summary["inter_token_latency"]["avg"], rel=1e-9)
    assert metrics["mean_e2el_ms"] == pytest.approx(summary["request_latency"]["avg"], rel=1e-9)


def test_a_refused_request_is_a_failure_with_its_status():
    records = read_records(DATA / "error-export.jsonl")
    assert len(records) == 2 and not any(r.success for r in records)
    assert all(r.http_status == 400 and "maximum context length" in r.error for r in records)
    assert all(r.num_prompt_tokens > 0 and r.num_output_tokens == 0 for r in records)
    metrics = compute_metrics(records, 1.0, [90.0], {"ttft": 2000}, {})
    assert metrics.failed == 2 and metrics.slo_attainment == 0.0


def test_warmup_records_are_left_out(tmp_path):
    lines = (DATA / "ok-export.jsonl").read_text().splitlines()
    warm = json.loads(lines[0])
    warm["metadata"]["benchmark_phase"] = "warmup"
    (tmp_path / "export.jsonl").write_text("\n".join([json.dumps(warm), *lines[1:]]) + "\n")
    assert len(read_records(tmp_path / "export.jsonl")) == 5


def _client(tmp_path, executable="aiperf", **workload) -> AIPerfClient:
    config = WorkloadConfig(**{"random_input_len": 256, "random_range_ratio": 0.5, "num_prompts": 60, **workload})
    return AIPerfClient(executable, config, "/models/small", tmp_path / "aiperf")


def _spec(rate=0.75, arrival="poisson", **endpoint) -> RunSpec:
    return RunSpec(EndpointConfig(base_url="http://127.0.0.1:8000", **endpoint), "small",
                   LoadConfig(request_rate=rate, arrival=arrival), {"ttft": 2000, "tpot": 200}, seed=11)


def _flag(argv, name):
    return [argv[i + 1] for i, value in enumerate(argv) if value == name]


def test_the_command_has_the_workloads_shape(tmp_path):
    argv = _client(tmp_path, output_len=64).command(_spec(ignore_eos=True, temperature=0.0), tmp_path / "out")
    assert argv[:2] == ["aiperf", "profile"]
    assert _flag(argv, "--isl") == ["256"] and _flag(argv, "--osl") == ["64"]
    assert json.loads(_flag(argv, "--random-range-ratio")[0]) == {"input": 0.5, "output": 0.0}
    assert _flag(argv, "--request-rate") == ["0.75"] and _flag(argv, "--arrival-pattern") == ["poisson"]
    assert _flag(argv, "--request-count") == ["60"] and _flag(argv, "--random-seed") == ["11"]
    assert _flag(argv, "--endpoint-type") == ["completions"] and "--streaming" in argv
    assert _flag(argv, "--url") == ["http://127.0.0.1:8000"] and _flag(argv, "--tokenizer") == ["/models/small"]
    assert sorted(_flag(argv, "--extra-inputs")) == ["ignore_eos:true", "temperature:0.0"]
    assert _flag(argv, "--artifact-dir") == [str(tmp_path / "out")]
    # no --output-len: the random output lengths and their range, as the built-in client draws them
    argv = _client(tmp_path, random_output_len=32).command(_spec(rate=math.inf, endpoint="/v1/chat/completions"),
                                                           tmp_path / "out")
    assert _flag(argv, "--osl") == ["32"]
    assert json.loads(_flag(argv, "--random-range-ratio")[0]) == {"input": 0.5, "output": 0.5}
    assert _flag(argv, "--endpoint-type") == ["chat"]
    assert _flag(argv, "--request-rate") == [] and _flag(argv, "--concurrency") == ["60"]  # all at once


@pytest.mark.parametrize("workload, arrival, api_key, says", [
    ({"dataset_name": "synthetic-chat"}, "poisson", None, "--dataset-name random"),
    ({"num_turns": 2}, "poisson", None, "--num-turns"),
    ({"prompt_format": "token_ids"}, "poisson", None, "--prompt-format"),
    ({}, "gamma", None, "--arrival gamma"),
    ({}, "poisson", "sk-secret", "API key"),
    # 384 prompt + 48 output tokens at most: does not fit 400 (pdserve's client would shorten the prompt)
    ({"random_input_len": 256, "random_output_len": 32, "random_range_ratio": 0.5, "max_model_len": 400},
     "poisson", None, r"--max-model-len 400: its longest request would be 384 prompt \+ 48 output"),
])
def test_what_aiperf_cannot_send_is_refused(workload, arrival, api_key, says):
    with pytest.raises(ValueError, match=says):
        check_aiperf(WorkloadConfig(**workload), arrival, api_key)
    check_aiperf(WorkloadConfig(), "poisson", None)  # the default workload is fine
    check_aiperf(WorkloadConfig(random_input_len=256, random_output_len=32, random_range_ratio=0.5, max_model_len=432),
                 "poisson", None)  # exactly fits


def test_without_aiperf_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ValueError, match="pip install aiperf"):
        find_aiperf(None)
    with pytest.raises(ValueError, match="not a file"):
        find_aiperf(str(tmp_path / "nowhere"))
    (tmp_path / ".venv-aiperf" / "bin").mkdir(parents=True)
    (tmp_path / ".venv-aiperf" / "bin" / "aiperf").write_text("")
    assert find_aiperf(None) == ".venv-aiperf/bin/aiperf"


def _stand_in(tmp_path, export: str | None, status: int) -> str:
    """An executable that records its argv and writes `export` (a fixture) as AIPerf writes its records."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    script = tmp_path / "bin" / "aiperf"
    script.write_text(f"""#!{sys.executable}
import json, shutil, sys
argv = sys.argv[1:]
out = argv[argv.index("--artifact-dir") + 1]
json.dump(argv, open(out + "/argv.json", "w"))
print("stand-in aiperf")
if {export!r}:
    shutil.copy({export!r}, out + "/profile_export.jsonl")
    shutil.copy({str(DATA / "ok-summary.json")!r}, out + "/profile_export_aiperf.json")
sys.exit({status})
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def _session(tmp_path, client) -> BenchSession:
    endpoint = EndpointConfig(base_url="http://127.0.0.1:9", ignore_eos=True)  # nothing listens: no counters
    return BenchSession(endpoint, "small", Workload([]), LoadConfig(request_rate=2.0), {"ttft": 2000, "tpot": 200},
                        (90.0, 99.0), PromptSynthesizer(None), {"label": "pdserve"},
                        OutputOptions(result_dir=tmp_path, show_progress=False), 11, client)


def test_a_run_through_aiperf_is_a_benchmark_result(tmp_path):
    client = _client(tmp_path, _stand_in(tmp_path, str(DATA / "ok-export.jsonl"), 0), output_len=16)
    result = _session(tmp_path, client).run_at(2.0)
    artifacts = tmp_path / "aiperf" / "pdserve-2qps"
    argv = json.loads((artifacts / "argv.json").read_text())
    assert _flag(argv, "--request-rate") == ["2"] and _flag(argv, "--osl") == ["16"]
    assert result["completed"] == 6 and result["failed"] == 0 and result["slo_attainment"] == 1.0
    summary = json.loads((DATA / "ok-summary.json").read_text())
    assert result["mean_ttft_ms"] == pytest.approx(summary["time_to_first_token"]["avg"])
    assert result["duration"] == pytest.approx(summary["benchmark_duration"]["avg"])
    assert len(result["ttfts"]) == len(result["itls"]) == 6


def test_failed_requests_count_and_a_silent_failure_is_an_error(tmp_path):
    client = _client(tmp_path, _stand_in(tmp_path, str(DATA / "error-export.jsonl"), 1))
    result = _session(tmp_path, client).run_at(2.0)  # AIPerf exits 1 when requests failed: they count
    assert result["completed"] == 0 and result["failed"] == 2 and result["slo_attainment"] == 0.0
    client = _client(tmp_path, _stand_in(tmp_path, None, 2))
    with pytest.raises(RuntimeError, match="(?s)status 2 and wrote no profile_export.jsonl.*stand-in aiperf"):
        _session(tmp_path, client).run_at(2.0)
