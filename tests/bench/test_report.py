"""The stdout table (vLLM's layout), `--goodput` parsing and the CLI's rejection of bad flags."""
import pytest

from bench.cli import main
from bench.config import parse_slos, parse_tenants
from bench.report import format_result_table, rate_to_json
from bench.side_by_side import format_comparison_table


def _result(**changes):
    result = {
        "request_rate": 2.0, "max_concurrency": 4, "completed": 9, "failed": 1, "duration": 5.0,
        "total_input_tokens": 900, "total_output_tokens": 450, "request_throughput": 1.8,
        "request_goodput": 1.4, "output_throughput": 90.0, "max_output_tokens_per_s": 120.0,
        "max_concurrent_requests": 3, "total_token_throughput": 270.0, "percentiles": [90.0, 99.0],
        "slo_attainment": 0.7, "goodput_slos_ms": {"ttft": 500.0, "tpot": 50.0},
        "tenants": {}, "jain_fairness_index": 1.0,
    }
    for name, base in (("ttft", 100.0), ("tpot", 20.0), ("itl", 19.0), ("e2el", 1000.0)):
        result.update({f"mean_{name}_ms": base, f"median_{name}_ms": base - 1, f"p90_{name}_ms": base + 1,
                       f"p99_{name}_ms": base + 2.5})
    result.update(changes)
    return result


def test_table_has_vllm_layout():
    table = format_result_table(_result(), percentile_metrics=("ttft", "tpot"))
    assert table.splitlines() == [
        "============ Serving Benchmark Result ============",
        "Successful requests:                     9         ",
        "Failed requests:                         1         ",
        "Maximum request concurrency:             4         ",
        "Request rate configured (RPS):           2.00      ",
        "Benchmark duration (s):                  5.00      ",
        "Total input tokens:                      900       ",
        "Total generated tokens:                  450       ",
        "Request throughput (req/s):              1.80      ",
        "Request goodput (req/s):                 1.40      ",
        "Output token throughput (tok/s):         90.00     ",
        "Peak output token throughput (tok/s):    120.00    ",
        "Peak concurrent requests:                3.00      ",
        "Total token throughput (tok/s):          270.00    ",
        "---------------Time to First Token----------------",
        "Mean TTFT (ms):                          100.00    ",
        "Median TTFT (ms):                        99.00     ",
        "P90 TTFT (ms):                           101.00    ",
        "P99 TTFT (ms):                           102.50    ",
        "-----Time per Output Token (excl. 1st token)------",
        "Mean TPOT (ms):                          20.00     ",
        "Median TPOT (ms):                        19.00     ",
        "P90 TPOT (ms):                           21.00     ",
        "P99 TPOT (ms):                           22.50     ",
        "------------------SLO Attainment------------------",
        "SLOs (ms):                               ttft:500 tpot:50",
        "SLO attainment (%):                      70.00     ",
        "==================================================",
    ]


def test_table_omits_what_was_not_configured_and_lists_tenants():
    tenants = {name: {"completed": 2, "num_requests": 3, "service_rate": rate, "mean_ttft_ms": 50.0}
               for name, rate in (("alice", 10.0), ("bob", 5.0))}
    table = format_result_table(_result(request_rate="inf", max_concurrency=None, request_goodput=None,
                                        slo_attainment=None, tenants=tenants, jain_fairness_index=0.9))
    assert "Request rate configured" not in table and "Maximum request concurrency" not in table
    assert "Request goodput" not in table and "SLO attainment" not in table
    assert "----------------End-to-end Latency----------------" in table
    assert "bob service rate (tok/s):                5.00      " in table.splitlines()
    assert "Jain's fairness index:                   0.90      " in table.splitlines()


def test_comparison_table_rows():
    outcomes = {
        "pdserve-colocated": {"runs": [_result(request_rate=2.0), _result(request_rate=1.0, cores_used=1.25)],
                              "goodput": {"target_attainment": 0.9, "max_rate": 1.5, "hit_ceiling": False,
                                          "num_devices": 1, "goodput_per_device": 1.5}},
        "vllm-cpu": {"runs": [_result(request_rate="inf", slo_attainment=None)], "goodput": None},
        "broken": {"runs": [], "goodput": None, "error": "the server exited with code 1\nTraceback"},
    }
    lines = format_comparison_table(outcomes).splitlines()
    rows = [line.split() for line in lines]
    assert rows[2][:4] == ["pdserve-colocated", "1.00", "1.80", "70.0"]  # sorted by rate
    assert rows[2][-1] == "1.25" and rows[3][-1] == "-"  # cores used: measured, or not known
    assert rows[3][:2] == ["pdserve-colocated", "2.00"]
    assert rows[4][:4] == ["vllm-cpu", "inf", "1.80", "-"]
    assert lines[5] == "broken                   not benchmarked: the server exited with code 1"
    assert rows[-2] == ["pdserve-colocated", "1.500", "1", "1.500"]
    assert rate_to_json(float("inf")) == "inf" and rate_to_json(2.0) == 2.0


def test_goodput_strings_parse():
    assert parse_slos(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    assert parse_slos("TTFT:250.5 e2el:3000") == {"ttft": 250.5, "e2el": 3000.0}
    assert parse_slos(None) == {}


@pytest.mark.parametrize("bad, message", [
    (["ttft=500"], "is not KEY:VALUE"),
    (["ttft:"], "is not KEY:VALUE"),
    (["latency:500"], "unknown metric 'latency'"),
    (["ttft:fast"], "not a number of milliseconds"),
    (["tpot:-5"], "must be a positive number"),
    (["ttft:1", "ttft:2"], "given twice"),
])
def test_bad_goodput_strings_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_slos(bad)


def test_cli_rejects_a_bad_goodput_string_before_sending_anything(capsys):
    # nothing listens on this URL: the flag must be rejected before any connection is tried
    code = main(["serve", "--base-url", "http://127.0.0.1:9", "--goodput", "ttft=500", "--disable-tqdm"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--goodput: 'ttft=500' is not KEY:VALUE; write e.g. --goodput ttft:500 tpot:100" in err


def test_cli_rejects_other_bad_flags(capsys):
    assert main(["goodput", "--base-url", "http://127.0.0.1:9", "--request-rate", "fast"]) == 2
    assert "--request-rate" in capsys.readouterr().err
    assert main(["serve", "--base-url", "http://127.0.0.1:9", "--tenants", "a:0"]) == 2
    assert "positive weight" in capsys.readouterr().err
    assert main(["serve"]) == 2  # argparse: --base-url is required
    assert "--base-url" in capsys.readouterr().err


def test_tenant_strings():
    assert parse_tenants("alice:3,bob:1, carol") == (("alice", 3.0), ("bob", 1.0), ("carol", 1.0))
    with pytest.raises(ValueError, match="distinct"):
        parse_tenants("a:1,a:2")
