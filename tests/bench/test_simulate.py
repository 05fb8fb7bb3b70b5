"""`pdserve simulate` and the bridge between bench and the simulator: the deployment YAML becomes the
instances `pdserve serve` would start, bench's workloads and arrival draws become the simulator's
conversations, and simulated records go through the benchmark's own metric code."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench.arrivals import arrival_times
from bench.config import LoadConfig, WorkloadConfig
from bench.datasets import build_workload
from bench.metrics import compute_metrics, slo_attainment
from bench.prompts import PromptSynthesizer
from bench.sim_inputs import sim_conversations, sim_deployment, to_request_records
from bench.simulate import main as simulate_main
from kvcache.layout import KVCacheLayout
from scheduler.latency_model import LatencyModel, PhaseCoefficients
from scheduler.latency_plans import LatencyModelSet, PlanLatency
from serving.config import Config
from tests.scheduler.sim_helpers import deployment, instance, poisson, run

LATENCY = LatencyModel(PhaseCoefficients(0.005, 1e-4, 1e-8), PhaseCoefficients(0.006, 1e-6, 2e-4),
                       meta={"tp": 1, "pp": 1, "dtype": "float32"})


def test_simulated_records_pass_through_the_benchmark_metrics():
    _, result = run(deployment(instance("prefill-0", "prefill"), instance("decode-0", "decode")),
                    poisson(200, 20.0, prompt=(50, 300), output=(2, 40), seed=1))
    records = to_request_records(result.records)
    metrics = compute_metrics(records, result.duration_s, [50.0, 99.0], {"ttft": 100.0, "tpot": 30.0})
    sim = result.records
    assert metrics.completed == 200 and metrics.failed == 0
    ttfts = [r.token_times_s[0] - r.start_s for r in sim]
    assert metrics.latency["ttft"].mean_ms == pytest.approx(1000 * np.mean(ttfts))
    tpots = [(r.token_times_s[-1] - r.token_times_s[0]) / (r.num_output_tokens - 1) for r in sim
             if r.num_output_tokens > 1]
    assert metrics.latency["tpot"].mean_ms == pytest.approx(1000 * np.mean(tpots))
    assert metrics.total_output_tokens == sum(r.num_output_tokens for r in sim)
    good = sum(t <= 0.1 and (r.num_output_tokens < 2 or (r.token_times_s[-1] - r.token_times_s[0])
                              / (r.num_output_tokens - 1) <= 0.03) for t, r in zip(ttfts, sim))
    assert metrics.slo_attainment == pytest.approx(good / 200)
    assert slo_attainment(records, {"ttft": 100.0, "tpot": 30.0}) == metrics.slo_attainment


def test_failed_simulated_requests_count_as_misses():
    _, result = run(deployment(instance("replica-0", "colocated", max_model_len=256)),
                    poisson(20, 5.0, prompt=(100, 400), output=8, seed=2))
    records = to_request_records(result.records)
    assert any(not r.success for r in records)
    assert slo_attainment(records, {"ttft": 1e9}) == sum(r.success for r in records) / len(records)


def test_the_simulators_arrivals_are_benchs_draws():
    workload = build_workload(WorkloadConfig(dataset_name="synthetic-code", num_prompts=50, seed=9),
                              PromptSynthesizer(None))
    load = LoadConfig(request_rate=3.0, arrival="gamma", burstiness=0.5)
    conversations = sim_conversations(workload, load, seed=9, extra_prompt_tokens=1)
    expected = arrival_times(load, 50, np.random.default_rng([9, 1]), workload.trace_times_s)
    assert [c.arrival_s for c in conversations] == pytest.approx(list(expected))
    assert [c.turns[0].num_input_tokens for c in conversations] == \
        [c.turns[0].num_input_tokens + 1 for c in workload.conversations]


def test_a_deployment_yaml_becomes_the_instances_serve_would_start(tiny_model_dir):
    config = Config.load("deploy/1p1d.yaml", {"model": tiny_model_dir})
    latency = LatencyModelSet({(1, 1): LATENCY})
    deploy = sim_deployment(config, latency)
    prefill, decode = deploy.instances
    assert (prefill.name, prefill.role, decode.name, decode.role) == ("prefill-0", "prefill", "decode-0", "decode")
    assert prefill.scheduler.max_num_batched_tokens == 4096 and prefill.scheduler.max_num_seqs == 16
    assert decode.scheduler.max_num_seqs == 256
    layout = KVCacheLayout.for_model(4, 2, 32, 16, "float32")  # the tiny model's
    assert prefill.num_blocks == (512 * 1024**2) // layout.bytes_per_block
    assert prefill.kv_bytes_per_token == layout.bytes_per_block // 16
    replicas = Config.from_dict({"model": tiny_model_dir, "num_replicas": 3, "num_gpu_blocks_override": 500,
                                 "parallel": {"tensor_parallel_size": 2}})
    deploy = sim_deployment(replicas, latency)
    assert [i.name for i in deploy.instances] == ["replica-0", "replica-1", "replica-2"]
    assert deploy.instances[0].num_blocks == 500 and deploy.instances[0].tp == 2
    assert isinstance(deploy.instances[0].latency, PlanLatency)
    with pytest.raises(ValueError, match="max seq len"):
        sim_deployment(Config.from_dict({"model": tiny_model_dir, "num_gpu_blocks_override": 2}), latency)


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_simulated_pools_are_sized_per_rank_as_the_engine_sizes_them(tiny_model_dir, tp, pp):
    """The KV budget is per rank, in blocks of rank 0's heads and layers; the host tier's in blocks of
    the largest stage's; a swap copies one rank's share of a block."""
    config = Config.from_dict({"model": tiny_model_dir, "kv_cache_memory_bytes": 64 * 2**20, "swap_space": 0.125,
                               "parallel": {"tensor_parallel_size": tp, "pipeline_parallel_size": pp}})
    instance = sim_deployment(config, LatencyModelSet({(1, 1): LATENCY})).instances[0]
    rank = KVCacheLayout.for_model(4 // pp, 2 // tp, 32, 16, "float32")  # the tiny model: 4 layers, 2 KV heads
    assert instance.num_blocks == 64 * 2**20 // rank.bytes_per_block
    assert instance.num_host_blocks == 2**27 // rank.bytes_per_block and instance.swap_block_bytes == rank.bytes_per_block
    assert instance.kv_bytes_per_token == KVCacheLayout.for_model(4, 2, 32, 16, "float32").bytes_per_block // 16


def test_a_gpu_deployment_without_a_kv_budget_is_sized_from_the_clusters_device_memory(tiny_model_dir):
    """As the engine sizes it on CUDA: --gpu-memory-utilization of a device, less the rank's share of the
    weights and a step's activations; a CPU deployment, or a named budget, keeps its own."""
    from bench.sim_inputs import LOCAL_CLUSTER
    from scheduler.planner.cluster import ClusterSpec
    from scheduler.planner.sizing import ModelShape
    from serving.models.config import ModelArchConfig
    from serving.runner.gpu_memory import activation_bytes
    gpus = ClusterSpec(nodes=1, devices_per_node=8, device_memory_gib=0.5, intra_node_bandwidth_gbps=100,
                       inter_node_bandwidth_gbps=10)
    latency = LatencyModelSet({(1, 1): LATENCY, (2, 1): LATENCY})
    arch = ModelArchConfig.from_model_dir(tiny_model_dir)
    shape = ModelShape("tiny", arch.num_layers, arch.hidden_size, arch.intermediate_size, arch.num_heads,
                       arch.num_kv_heads, arch.head_dim, arch.vocab_size, arch.max_position_embeddings,
                       arch.tie_word_embeddings)
    for tp in (1, 2):
        config = Config.from_dict({"model": tiny_model_dir, "device": "cuda", "dtype": "float32",
                                   "gpu_memory_utilization": 0.8, "parallel": {"tensor_parallel_size": tp}})
        instance = sim_deployment(config, latency, gpus).instances[0]
        budget = (int(0.8 * 2**29) - shape.weight_bytes("float32") // tp
                  - activation_bytes(arch, config.scheduler.max_num_batched_tokens, config.scheduler.max_num_seqs,
                                     4, tp))
        rank = KVCacheLayout.for_model(4, 2 // tp, 32, 16, "float32")
        assert instance.num_blocks == budget // rank.bytes_per_block
        assert instance.num_blocks * rank.bytes_per_block != 512 * 2**20
        # on this machine (a CPU cluster), or with a budget named, the runtime's own sizes
        assert sim_deployment(config, latency, LOCAL_CLUSTER).instances[0].num_blocks == 2**29 // rank.bytes_per_block
        named = config.replace(kv_cache_memory_bytes=2**24)
        assert sim_deployment(named, latency, gpus).instances[0].num_blocks == 2**24 // rank.bytes_per_block
    with pytest.raises(ValueError, match="--gpu-memory-utilization 0.01 .* leaves no room for the KV cache"):
        sim_deployment(config.replace(gpu_memory_utilization=0.01), latency, gpus)


def test_a_partitioned_pipeline_is_sized_by_its_largest_stage_and_warned_of_a_profile_of_another(
        tiny_model_dir, caplog):
    config = Config.from_dict({"model": tiny_model_dir, "kv_cache_memory_bytes": 64 * 2**20,
                               "parallel": {"pipeline_parallel_size": 2, "pp_layer_partition": [3, 1]}})
    profiled = dataclasses.replace(LATENCY, meta={**LATENCY.meta, "pp": 2, "pp_partition": [2, 2]})
    with caplog.at_level(logging.WARNING, logger="bench.sim_inputs"):
        instance = sim_deployment(config, LatencyModelSet({(1, 2): profiled})).instances[0]
    assert instance.num_blocks == 64 * 2**20 // KVCacheLayout.for_model(3, 2, 32, 16, "float32").bytes_per_block
    assert "stages hold 3,1 layers, but its latency model was profiled with stages of 2,2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bench.sim_inputs"):
        sim_deployment(config.replace(pp_layer_partition="2,2"), LatencyModelSet({(1, 2): profiled}))
    assert "profiled with stages" not in caplog.text


def _write(tmp_path, model_dir):
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({"model": {"model": model_dir, "max_model_len": 1024},
                                      "deploy": {"mode": "disaggregated"}}))
    latency = tmp_path / "latency.json"
    LATENCY.save(str(latency))
    return str(config), str(latency)


def test_pdserve_simulate_writes_benchs_result_and_compare_replays_it(tmp_path, tiny_model_dir, capsys):
    config, latency = _write(tmp_path, tiny_model_dir)
    out = tmp_path / "out"
    common = ["--config", config, "--latency-model", latency, "--disable-tqdm"]
    code = simulate_main([*common, "--dataset-name", "random", "--random-input-len", "64", "--random-output-len", "8",
                          "--num-prompts", "30", "--request-rate", "2,20", "--goodput", "ttft:50", "tpot:20",
                          "--save-result", "--result-dir", str(out), "--result-filename", "sim.json"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Simulated Serving Benchmark Result" in printed and "SLO attainment (%)" in printed
    results = [json.loads((out / f"sim-{rate}qps.json").read_text()) for rate in (2, 20)]
    for result in results:
        for key in ("ttfts", "itls", "tpots", "input_lens", "output_lens", "slo_attainment", "mean_ttft_ms",
                    "request_throughput", "errors", "simulation"):
            assert key in result
        assert result["completed"] == 30 and result["input_lens"][0] == 65  # the tokenizer's BOS is counted
    assert list(out.glob("*-attainment.png")) and list(out.glob("*-cdf.png"))
    code = simulate_main([*common, "--compare", str(out / "sim-2qps.json"), str(out / "sim-20qps.json"),
                          "--save-result", "--result-dir", str(out), "--result-filename", "compare.json"])
    assert code == 0
    compare = json.loads((out / "compare.json").read_text())
    for row in compare["rows"]:  # replaying a simulated run through the same simulation changes nothing
        assert row["simulated"]["slo_attainment"] == pytest.approx(row["measured"]["slo_attainment"])
        assert row["simulated"]["mean_ttft_ms"] == pytest.approx(row["measured"]["mean_ttft_ms"])
        assert row["simulated"]["num_preemptions"] == row["measured"]["num_preemptions"]  # the instances' sum
        assert row["measured"]["num_preemptions"] == sum(i["num_preemptions"] for i in json.loads(
            Path(row["file"]).read_text())["simulation"]["instances"].values())
    assert "largest attainment gap 0.0 pp" in capsys.readouterr().out


def test_pdserve_simulate_says_what_is_wrong(tmp_path, tiny_model_dir, capsys):
    config, latency = _write(tmp_path, tiny_model_dir)
    assert simulate_main(["--config", config, "--latency-model", str(tmp_path / "none.json")]) == 2
    assert "pdserve profile" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("deploy: {mode: sideways}\n")
    assert simulate_main(["--config", str(bad), "--latency-model", latency]) == 2
    assert "--mode must be one of" in capsys.readouterr().err
    bad.write_text("deploy: [mode\n")
    assert simulate_main(["--config", str(bad), "--latency-model", latency]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    assert simulate_main(["--config", str(tmp_path / "none.yaml"), "--latency-model", latency]) == 2
    assert "cannot read the deployment" in capsys.readouterr().err


def test_a_simulated_run_counts_its_preemptions_as_a_served_one_does(tiny_model_dir):
    """A pool too small for the load preempts; the result's num_preemptions (what `--compare` puts
    beside the server's counter) is the instances' count, and each request's own preemptions add up
    to it."""
    from bench.config import EndpointConfig
    from bench.runner import RunSpec
    from bench.simulate import sim_result_dict, simulate_run
    from scheduler.simulator import SimConversation, SimTurn
    config = Config.from_dict({"model": tiny_model_dir, "max_model_len": 256, "num_gpu_blocks_override": 24})
    deploy = sim_deployment(config, LatencyModelSet({(1, 1): LATENCY}))
    conversations = [SimConversation(i, 0.01 * i, (SimTurn(100, 150),)) for i in range(8)]
    result = simulate_run(deploy, conversations, False, "")
    spec = RunSpec(EndpointConfig(), "tiny", LoadConfig(request_rate=100.0, arrival="trace"), {}, (99,))
    out = sim_result_dict(result, spec, {"label": "simulated"}, {}, deploy)
    assert out["num_preemptions"] > 0 and out["completed"] == 8
    assert out["num_preemptions"] == sum(record.num_preemptions for record in result.records)
