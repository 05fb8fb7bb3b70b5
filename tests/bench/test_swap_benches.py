"""bench/swap.py and bench/swap_tail.py: the throughput bench runs the real swap worker on a small
shape (and checks every swap bit for bit); the tail bench's summary reads what bench serve recorded
(its records and the server's counters)."""
import json

from bench import swap, swap_tail


def test_swap_throughput_bench_counts_fewer_copies_with_groups(tmp_path):
    out = tmp_path / "swap.json"
    assert swap.main(["--requests", "3", "--context", "128", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    lru, groups = result["rows"]
    assert lru["strategy"] == "lru" and groups["strategy"] == "groups"
    assert lru["copies_per_swap_per_layer"] == 8  # 128 tokens / 16: one copy per block
    assert groups["copies_per_swap_per_layer"] <= 2 and result["ratios"]["copies"] >= 4


def test_swap_tail_summary_reads_percentiles_and_server_counters():
    result = {"errors": ["", "", "boom"], "ttfts": [0.1, 0.3, None], "itls": [[0.02, 0.04], [0.03], []],
              "latencies": [1.0, 2.0, 0.0],
              "server_counters": {'pdserve:kv_swap_preemptions_swap_total{model_name="m"}': 7.0,
                                  'pdserve:num_preemptions_total{model_name="m"}': 5.0,
                                  'pdserve:num_preemptions_total{model_name="n"}': 4.0,
                                  'pdserve:num_preemptions_total_other': 100.0}}
    summary = swap_tail.summarize(result)
    assert summary["requests"] == 3 and summary["failed"] == 1
    assert summary["p50_ttft_ms"] == 200.0 and summary["preemptions_swap"] == 7 and summary["num_preemptions"] == 9
    assert summary["p99_tbt_ms"] > summary["p50_tbt_ms"] == 30.0 and summary["mean_e2el_ms"] == 1500.0
    table = swap_tail.format_table({"recompute": {**summary, "p99_ttft_ms": 400.0}, "swap-groups": summary})
    assert "recompute / swap-groups: P99 TTFT" in table


def test_swap_tail_names_unknown_modes(capsys):
    assert swap_tail.main(["--model", "x", "--modes", "teleport"]) == 2
    assert "unknown --modes teleport" in capsys.readouterr().out
