"""The soak run, small: ~50 mixed requests with aborts against a real 1P1D `pdserve serve` on the tiny
model, started by the soak itself. Checks the report's fields and their consistency, not timings or
leak figures (the chaos suite asserts those)."""
import json
import subprocess

import pytest

from bench.processes import Sample, summarize
from bench.records import RequestRecord
from bench.soak import SoakConfig, main, make_requests, outcome
from bench.systems import pdserve_executable

NUM_REQUESTS = 48
SERIES_KEYS = {"start", "max", "end", "slope_per_hour", "late_slope_per_hour"}


def test_load_is_mixed_and_reproducible():
    config = SoakConfig(num_requests=400, abort_fraction=0.25, seed=3)
    requests = make_requests(config, "m")
    assert requests == make_requests(config, "m")
    kinds = {(r.kind, r.payload["stream"], r.payload["n"]) for r in requests}
    assert kinds == {(k, s, n) for k in ("chat", "completions") for s in (True, False) for n in (1, 2)}
    assert 60 < sum(r.abort_after_s is not None for r in requests) < 140
    assert all(1 <= r.payload["max_tokens"] <= config.max_output_tokens for r in requests)
    assert all(r.payload.get("stream_options") == ({"include_usage": True} if r.payload["stream"] else None)
               for r in requests)


def test_process_summary_slopes():
    samples = [Sample(t, 7 if t < 5 else 8, 1000 + (100 * t if t >= 5 else 0), 10 + t) for t in range(11)]
    summary = summarize(samples)
    assert summary["pids"] == [7, 8] and summary["num_samples"] == 11
    assert summary["rss_bytes"]["start"] == 1000 and summary["rss_bytes"]["end"] == 2000
    assert summary["rss_bytes"]["late_slope_per_hour"] == pytest.approx(100 * 3600)
    assert summary["num_fds"]["slope_per_hour"] == pytest.approx(3600) == summary["num_fds"]["late_slope_per_hour"]
    assert summary["samples"]["pid"][-1] == 8


def test_outcomes_by_kind():
    finished = RequestRecord("a", success=True, finish_reasons=["stop", "length", "length"], http_status=200)
    assert outcome(finished, aborted=False) == ("finished", "length+stop")
    assert outcome(finished, aborted=True) == ("aborted", "client")
    assert outcome(RequestRecord("b", http_status=503, error="HTTP 503: busy"), False) == ("error", "http_503")
    assert outcome(RequestRecord("c", http_status=200, error="engine died"), False) == ("error", "error_in_stream")
    assert outcome(RequestRecord("d", error="no complete reply within --request-timeout 5 s"), False) == \
        ("error", "timeout")
    assert outcome(RequestRecord("e", error="ConnectError: refused"), False) == ("error", "ConnectError")
    empty = RequestRecord("f", http_status=200, finish_reasons=["stop"],
                          error="the stream ended without any output chunk")
    assert outcome(empty, False) == ("finished", "stop (empty text)")  # EOS first: nothing went wrong


@pytest.mark.slow
def test_soak_against_1p1d_writes_the_report(tmp_path):
    model_dir = tmp_path / "tiny"
    subprocess.run([*pdserve_executable(), "make-model", "--size", "tiny", "--out", str(model_dir)],
                   check=True, timeout=300)
    code = main(["--model", str(model_dir), "--num-prefill", "1", "--num-decode", "1",
                 "--num-requests", str(NUM_REQUESTS), "--concurrency", "8", "--abort-fraction", "0.3",
                 "--max-abort-delay", "0.5", "--max-prompt-tokens", "64", "--max-output-tokens", "16",
                 "--sample-interval", "0.5", "--drain-timeout", "30", "--result-dir", str(tmp_path / "out"),
                 "--result-filename", "soak", "--disable-tqdm"])
    report = json.loads((tmp_path / "out" / "soak.json").read_text())
    assert code == (0 if report["drained"] else 1)
    assert set(report) == {"date", "base_url", "model", "config", "num_requests", "duration_s", "outcomes",
                           "processes", "blocks", "drained", "num_blocks_leaked"}
    assert report["num_requests"] == NUM_REQUESTS and report["config"]["abort_fraction"] == 0.3
    tally = report["outcomes"]
    assert sum(tally["finished"].values()) + tally["aborted"] + sum(tally["errors"].values()) == NUM_REQUESTS
    assert set(tally["finished"]) <= {"length", "stop", "length+stop"} and tally["aborted"] > 0
    assert set(tally["error_examples"]) == set(tally["errors"])
    assert set(report["processes"]) == {"api-server", "prefill-0", "decode-0"}
    for process in report["processes"].values():
        samples = process["samples"]
        assert process["num_samples"] == len(samples["time_s"]) >= 2
        assert len(samples["rss_bytes"]) == len(samples["num_fds"]) == process["num_samples"]
        assert set(process["rss_bytes"]) == set(process["num_fds"]) == SERIES_KEYS
        assert process["rss_bytes"]["max"] >= process["rss_bytes"]["end"] > 0 and process["num_fds"]["end"] > 0
        assert process["pids"] and samples["time_s"] == sorted(samples["time_s"])
    assert set(report["blocks"]) == {"prefill-0", "decode-0"}
    for blocks in report["blocks"].values():
        assert blocks["num_leaked_blocks"] == blocks["num_total_blocks"] - blocks["num_free_blocks"]
        assert blocks["num_total_blocks"] > 0 and blocks["up"] == 1
    assert report["num_blocks_leaked"] == sum(b["num_leaked_blocks"] for b in report["blocks"].values())
    assert (tmp_path / "out" / "soak.png").stat().st_size > 5_000
    assert (tmp_path / "out" / "pdserve-soak-server.log").exists()
