import json

from bench.offline_throughput import main, make_output_lens


def test_output_length_distributions():
    assert make_output_lens(5, 10, "fixed", 0) == [10] * 5
    lens = make_output_lens(2000, 10, "uniform", 0)
    assert min(lens) >= 1 and max(lens) <= 19
    assert abs(sum(lens) / len(lens) - 10) < 0.5


def test_offline_benchmark_runs_both_systems(tiny_model_dir, tmp_path):
    out = tmp_path / "offline.json"
    assert main(["--model", tiny_model_dir, "--batch-sizes", "1,3", "--input-len", "12", "--output-len", "5",
                 "--output-len-dist", "uniform", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    for row, batch in zip(rows, (1, 3)):
        wanted = sum(make_output_lens(batch, 5, "uniform", 0 + batch))
        assert row["pdserve"]["output_tokens"] == wanted  # every request got exactly its max_tokens
        assert row["transformers"]["output_tokens"] == wanted
        assert 0.0 <= row["pdserve"]["overhead_share"] < 1.0
        assert row["ratio"] > 0


def test_offline_vs_vllm_runs_each_configuration_in_its_own_process(tiny_model_dir, tmp_path):
    """Without vLLM installed (CI): pdserve's two configurations, each in a fresh process, the same
    greedy tokens from both; asking for vLLM without its interpreter is an error that says what to do."""
    import pytest
    from bench import offline_vs_vllm
    out = tmp_path / "vs.json"
    assert offline_vs_vllm.main(["--model", tiny_model_dir, "--systems", "pdserve-1core,pdserve", "--batch-sizes",
                                 "1,3", "--input-len", "12", "--output-len", "5", "--repeats", "1",
                                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["batch"] for r in result["rows"]] == [1, 3]
    for row in result["rows"]:
        assert row["output_tokens"] == 5 * row["batch"]
        assert row["pdserve"] > 0 and row["pdserve-1core"] > 0
        assert row["pdserve_differ"] == 0
    assert result["mismatches"] == []
    with pytest.raises(SystemExit):
        offline_vs_vllm.main(["--model", tiny_model_dir, "--vllm-python", str(tmp_path / "none")])
    with pytest.raises(SystemExit):
        offline_vs_vllm.main(["--model", tiny_model_dir, "--systems", "sglang"])
