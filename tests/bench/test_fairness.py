"""bench/fairness.py: the simulated comparison shows what VTC is for, the real-server path asks
`pdserve bench serve` for tenants and reads its result file back."""
from __future__ import annotations

import json

import pytest

from bench import fairness
from bench.cli import build_parser as bench_parser
from bench.config import EndpointConfig, LoadConfig
from bench.metrics import compute_metrics
from bench.report import run_result_dict
from bench.runner import RunResult, RunSpec
from tests.bench.helpers import make_record


def test_simulated_vtc_evens_out_service_and_light_tenant_ttft(tmp_path):
    out = tmp_path / "fairness.json"
    assert fairness.main(["--num-requests", "400", "--request-rate", "8", "--json", str(out)]) == 0
    simulated = json.loads(out.read_text())["simulated"]
    fcfs, vtc = simulated["fcfs"], simulated["vtc"]
    assert fcfs["tenants"]["heavy"]["service_share"] > 0.65  # in proportion to what each sends
    # a short run: the last in-flight requests weigh more than in the default 3000 (0.998 vs 0.800)
    assert vtc["jain_index"] > 0.9 and vtc["jain_index"] > fcfs["jain_index"] + 0.08
    assert vtc["tenants"]["light"]["mean_ttft_ms"] < fcfs["tenants"]["light"]["mean_ttft_ms"] / 2
    assert set(vtc["scheduler_service"]) == {"heavy", "light"} and fcfs["scheduler_service"] == {}


def test_the_real_run_sends_tenants_and_reads_the_result_back(tmp_path):
    args = fairness.build_parser().parse_args(["--real", "--model", "/models/m"])
    argv = fairness.bench_argv(args, "http://127.0.0.1:9", tmp_path, "fairness-vtc.json", "pdserve-vtc")
    parsed = bench_parser().parse_args(argv)
    assert parsed.tenants == "heavy:3,light:1" and parsed.ignore_eos and parsed.save_result
    records = [make_record(0.0, 0.1, [0.01] * 4, tenant="heavy", num_prompt_tokens=20),
               make_record(0.5, 0.3, [0.01] * 9, tenant="light", num_prompt_tokens=10),
               make_record(0.7, success=False, tenant="light")]
    spec = RunSpec(EndpointConfig(), "m", LoadConfig(), {})
    result = run_result_dict(RunResult(spec, records, 2.0, compute_metrics(records, 2.0, [99.0])), {})
    back = fairness.records_from_result(json.loads(json.dumps(result)))
    assert [(r.tenant, r.num_prompt_tokens, r.num_output_tokens, r.success) for r in back] == \
        [("heavy", 20, 5, True), ("light", 10, 10, True), ("light", 10, 0, False)]
    assert [t for r in back for t in r.token_times_s()] == pytest.approx(
        [t for r in records for t in r.token_times_s()])
    summary = fairness.summarize(back)
    assert summary["tenants"]["light"]["p99_ttft_ms"] == pytest.approx(300.0)


def test_the_real_run_needs_a_model(capsys):
    assert fairness.main(["--real", "--num-requests", "10"]) == 2
    assert "--real needs --model DIR" in capsys.readouterr().err
