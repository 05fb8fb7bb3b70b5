"""Live runs against a real `pdserve serve` on a tiny model: every field of the result file, the chat
endpoint, and a side-by-side comparison that starts a server of its own.

The server is started through bench.systems (the side-by-side runner's launcher) on a free loopback
port and stopped at the end of the module.
"""
import json
import math
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from bench.cli import main
from bench.systems import RunningSystem, SystemSpec, pdserve_executable

pytestmark = pytest.mark.slow

NUM_PROMPTS = 10
OUTPUT_LEN = 8
METRICS = ("ttft", "tpot", "itl", "e2el")
RUN_KEYS = {
    "date", "started_at", "label", "backend", "endpoint", "base_url", "model_id", "tokenizer_id", "dataset_name",
    "num_prompts", "num_turns", "prompt_format", "ignore_eos", "seed", "tenant_weights", "request_rate",
    "arrival", "burstiness", "max_concurrency", "goodput_slos_ms", "percentiles", "num_requests",
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
    "request_goodput", "output_throughput", "total_token_throughput", "max_output_tokens_per_s",
    "max_concurrent_requests", "slo_attainment", "tenants", "jain_fairness_index", "input_lens",
    "output_lens", "ttfts", "tpots", "itls", "latencies", "start_times", "queue_times", "request_tenants",
    "errors", "generated_texts", "server_counters", "num_preemptions",
    *(f"{stat}_{metric}_ms" for metric in METRICS for stat in ("mean", "median", "std", "p90", "p99")),
}
TENANT_KEYS = {"weight", "num_requests", "completed", "total_input_tokens", "total_output_tokens",
               "service_tokens", "service_rate", "mean_ttft_ms", "mean_tpot_ms", "slo_attainment"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tiny-model")
    subprocess.run([*pdserve_executable(), "make-model", "--size", "tiny", "--out", str(out)],
                   check=True, timeout=300)
    return str(out)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    spec = SystemSpec("pdserve-live", "pdserve", model=model_dir, startup_timeout_s=300)
    with RunningSystem(spec, tmp_path_factory.mktemp("logs")) as base_url:
        yield base_url


def check_result(result: dict, model_dir: str, num_requests: int, output_len: int) -> None:
    """Every field present, consistent with the per-request lists and the definitions."""
    assert set(result) == RUN_KEYS
    assert time.time() - 3600 < result["started_at"] < time.time() - result["duration"]  # wall clock, like traces
    assert (result["completed"], result["failed"], result["num_requests"]) == (num_requests, 0, num_requests)
    assert result["errors"] == [""] * num_requests
    assert result["output_lens"] == [output_len] * num_requests  # max_tokens with ignore_eos
    assert result["total_output_tokens"] == output_len * num_requests
    assert all(n > 0 for n in result["input_lens"]) and result["total_input_tokens"] == sum(result["input_lens"])
    assert result["tokenizer_id"] == model_dir and result["model_id"]
    duration = result["duration"]
    assert result["request_throughput"] == pytest.approx(num_requests / duration)
    assert result["output_throughput"] == pytest.approx(output_len * num_requests / duration)
    assert result["total_token_throughput"] == pytest.approx(
        (result["total_input_tokens"] + result["total_output_tokens"]) / duration)
    ttfts, latencies = np.array(result["ttfts"]), np.array(result["latencies"])
    assert np.all(ttfts > 0) and np.all(latencies >= ttfts)
    for ttft, latency, gaps, tpot in zip(ttfts, latencies, result["itls"], result["tpots"]):
        assert len(gaps) >= 1 and ttft + sum(gaps) == pytest.approx(latency)
        assert tpot == pytest.approx((latency - ttft) / (output_len - 1))
    assert result["mean_ttft_ms"] == pytest.approx(1000 * ttfts.mean())
    assert result["p99_e2el_ms"] == pytest.approx(1000 * np.percentile(latencies, 99))
    assert result["median_itl_ms"] == pytest.approx(1000 * np.median(np.concatenate(result["itls"])))
    for metric in METRICS:
        assert 0 < result[f"median_{metric}_ms"] <= result[f"p90_{metric}_ms"] <= result[f"p99_{metric}_ms"]
    assert 1 <= result["max_concurrent_requests"] <= 4 and result["max_output_tokens_per_s"] >= 1
    assert result["slo_attainment"] == 1.0  # SLOs of a minute: every completed request meets them
    # what the server counted during the run (its /metrics before and after): exactly these requests
    counters = result["server_counters"]
    generated = [v for name, v in counters.items() if name.startswith("pdserve:generation_tokens_total{")]
    assert generated == [output_len * num_requests], counters
    assert result["num_preemptions"] == 0
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert set(result["tenants"]) == {"a", "b"} == set(result["request_tenants"])
    assert all(set(t) == TENANT_KEYS for t in result["tenants"].values())
    assert sum(t["num_requests"] for t in result["tenants"].values()) == num_requests
    assert 0.5 <= result["jain_fairness_index"] <= 1.0
    assert all(isinstance(text, str) for text in result["generated_texts"])
    assert all(q >= 0 for q in result["queue_times"]) and all(t >= 0 for t in result["start_times"])


def test_live_run_writes_every_field(server, model_dir, tmp_path):
    code = main(["serve", "--base-url", server, "--model", model_dir, "--num-prompts", str(NUM_PROMPTS),
                 "--random-input-len", "16", "--random-output-len", str(OUTPUT_LEN), "--ignore-eos",
                 "--request-rate", "20", "--max-concurrency", "4", "--goodput", "ttft:60000", "tpot:60000",
                 "--tenants", "a:1,b:1", "--save-result", "--save-detailed", "--result-dir", str(tmp_path),
                 "--result-filename", "live.json", "--disable-tqdm"])
    assert code == 0
    result = json.loads((tmp_path / "live.json").read_text())
    check_result(result, model_dir, NUM_PROMPTS, OUTPUT_LEN)
    assert result["request_rate"] == 20.0 and result["max_concurrency"] == 4
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["live-attainment.png", "live-cdf.png"]
    assert all((tmp_path / name).stat().st_size > 5_000 for name in pngs)


def test_live_chat_multi_turn(server, model_dir, tmp_path):
    code = main(["serve", "--base-url", server, "--model", model_dir, "--endpoint", "/v1/chat/completions",
                 "--num-prompts", "2", "--num-turns", "2", "--random-input-len", "8", "--output-len", "4",
                 "--ignore-eos", "--save-result", "--result-dir", str(tmp_path), "--result-filename",
                 "chat.json", "--disable-tqdm"])
    assert code == 0
    result = json.loads((tmp_path / "chat.json").read_text())
    assert (result["completed"], result["failed"]) == (4, 0) and result["output_lens"] == [4] * 4
    # a second turn carries the first turn and its reply, so its prompt is longer
    assert result["input_lens"][1] > result["input_lens"][0]


def test_live_side_by_side(server, model_dir, tmp_path):
    code = main(["compare", "--model", model_dir, "--systems", "pdserve-colocated", "--url",
                 f"running={server}", "--num-prompts", "4", "--random-input-len", "8", "--output-len", "4",
                 "--ignore-eos", "--request-rate", "inf", "--goodput", "ttft:60000", "--result-dir",
                 str(tmp_path), "--disable-tqdm"])
    assert code == 0
    [result_file] = list(tmp_path.glob("compare-*.json"))
    outcomes = json.loads(result_file.read_text())["systems"]
    assert set(outcomes) == {"pdserve-colocated", "running"}
    for outcome in outcomes.values():
        [run] = outcome["runs"]
        assert (run["completed"], run["failed"], run["slo_attainment"]) == (4, 0, 1.0)
        assert not math.isinf(run["duration"])
    # the server it started: the CPU its processes spent over the run; a URL's server: unknown
    assert outcomes["pdserve-colocated"]["runs"][0]["cores_used"] > 0
    assert "cores_used" not in outcomes["running"]["runs"][0]
    assert len(list(tmp_path.glob("compare-*-cdf.png"))) == 1
    assert Path(tmp_path / "pdserve-colocated-server.log").exists()


def test_live_side_by_side_only_some_systems_of_a_file(server, model_dir, tmp_path, capsys):
    systems = tmp_path / "systems.yaml"
    systems.write_text(f"systems:\n  - {{name: here, kind: url, url: '{server}'}}\n"
                       f"  - {{name: elsewhere, kind: url, url: 'http://127.0.0.1:9'}}\n")
    common = ["--model", model_dir, "--systems-file", str(systems), "--num-prompts", "2", "--random-input-len",
              "8", "--output-len", "2", "--ignore-eos", "--request-rate", "inf", "--result-dir", str(tmp_path),
              "--disable-tqdm"]
    assert main(["compare", *common, "--only", "here,nowhere"]) == 1
    assert "--only: nowhere not in" in capsys.readouterr().err
    assert main(["compare", *common, "--only", "here"]) == 0  # `elsewhere` (nothing listens) is left out
    [result_file] = list(tmp_path.glob("compare-*.json"))
    assert set(json.loads(result_file.read_text())["systems"]) == {"here"}


def test_live_goodput_search(server, model_dir, tmp_path):
    # SLOs of a minute never fail, so the search doubles until its probe budget runs out
    code = main(["goodput", "--base-url", server, "--model", model_dir, "--num-prompts", "3",
                 "--random-input-len", "8", "--output-len", "2", "--goodput", "ttft:60000", "tpot:60000",
                 "--rate-low", "1", "--rate-high", "2", "--max-probes", "2", "--num-devices", "2",
                 "--save-result", "--result-dir", str(tmp_path), "--result-filename", "search.json",
                 "--disable-tqdm"])
    assert code == 0
    saved = json.loads((tmp_path / "search-goodput.json").read_text())
    search = saved["search"]
    assert [p["rate"] for p in search["probes"]] == [1.0, 2.0]
    assert (search["max_rate"], search["hit_ceiling"], search["goodput_per_device"]) == (2.0, True, 1.0)
    assert [run["request_rate"] for run in saved["runs"]] == [1.0, 2.0]
    assert (tmp_path / "search-goodput-attainment.png").stat().st_size > 5_000
