"""`pdserve plan` end to end on the tiny model: its YAML loads with Config.load and starts with
`pdserve serve --config` (slow); bad inputs get an error that says what to change."""
from __future__ import annotations

import json

import httpx
import pytest
import yaml

from bench.plan import main as plan_main
from bench.plan_output import role_keys
from bench.sim_inputs import model_shape, sim_deployment
from scheduler.config import SchedulerConfig
from scheduler.latency_plans import LatencyModelSet
from scheduler.planner import ClusterSpec
from scheduler.planner.instances import ModelSetup
from scheduler.latency_model import LatencyModel, PhaseCoefficients
from serving.config import Config
from tests.servers import free_port, start_server, stop_server

LATENCY = LatencyModel(PhaseCoefficients(0.004, 8e-5, 1e-8), PhaseCoefficients(0.005, 1e-6, 3e-4),
                       meta={"tp": 1, "pp": 1, "dtype": "float32"})
# two one-core "nodes": tensor parallelism cannot be chosen (it stays in a node), which keeps the search short
CLUSTER = {"name": "two cores", "nodes": 2, "devices_per_node": 1, "device_memory_gib": 0.06,
           "intra_node_bandwidth_gbps": 8, "inter_node_bandwidth_gbps": 8, "memory_utilization": 0.5,
           "device": "cpu"}
WORKLOAD = ["--dataset-name", "random", "--random-input-len", "96", "--random-output-len", "12",
            "--random-range-ratio", "0.5", "--num-prompts", "80", "--max-model-len", "512"]


def _inputs(tmp_path, cluster=None):
    latency = tmp_path / "latency.json"
    LATENCY.save(str(latency))
    cluster_path = tmp_path / "cluster.yaml"
    cluster_path.write_text(yaml.safe_dump(cluster or CLUSTER))
    return str(latency), str(cluster_path)


def _plan(tmp_path, model_dir, *extra, cluster=None):
    latency, cluster_path = _inputs(tmp_path, cluster)
    out = tmp_path / "plan.yaml"
    code = plan_main(["--model", model_dir, "--cluster", cluster_path, "--latency-model", latency,
                      "--goodput", "ttft:300", "tpot:60", "--out", str(out), "--pp-sizes", "1", "--max-probes", "6",
                      "--verify-requests", "200", "--disable-tqdm", *WORKLOAD, *extra])
    return code, out


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_the_plans_kv_budget_gives_each_instance_the_blocks_it_was_simulated_with(tiny_model_dir, tp, pp):
    """--kv-cache-memory-bytes is per rank: the YAML's budget, sized as the engine sizes its pool (the
    simulator's sim_deployment, tested against the engine's rule in test_simulate.py), gives back the
    plan's blocks, and a rank's pool fits its device's usable memory beside its weights."""
    shape = model_shape(tiny_model_dir)
    cluster = ClusterSpec(nodes=1, devices_per_node=4, device_memory_gib=0.06, intra_node_bandwidth_gbps=8,
                          inter_node_bandwidth_gbps=8, memory_utilization=0.5, device="cpu")
    latency = LatencyModelSet({(1, 1): LATENCY})
    setup = ModelSetup(shape, cluster, latency, "float32", 16, 512)
    plan = setup.instance_plan("colocated", tp, pp, SchedulerConfig())
    keys = role_keys(plan, shape, "float32", 16)
    budget = keys.pop("kv_cache_memory_bytes")
    assert budget + shape.weight_bytes("float32") / (tp * pp) <= cluster.device_memory_bytes * 0.5
    colocated = Config.from_dict({"model": tiny_model_dir, "kv_cache_memory_bytes": budget, "parallel": keys})
    assert sim_deployment(colocated, latency).instances[0].num_blocks == plan.num_blocks
    prefill, decode = (setup.instance_plan("prefill", 1, 1, SchedulerConfig()),
                       setup.instance_plan("decode", tp, pp, SchedulerConfig()))
    disaggregated = Config.from_dict({"model": tiny_model_dir, "deploy": {
        "mode": "disaggregated", "num_prefill": 1, "num_decode": 1,
        "prefill_overrides": role_keys(prefill, shape, "float32", 16),
        "decode_overrides": role_keys(decode, shape, "float32", 16)}})
    prefill_sim, decode_sim = sim_deployment(disaggregated, latency).instances
    assert decode_sim.num_blocks == decode.num_blocks and (decode_sim.tp, decode_sim.pp) == (tp, pp)
    assert prefill_sim.num_blocks == prefill.num_blocks


def test_the_plan_loads_as_a_config_with_the_instances_it_chose(tmp_path, tiny_model_dir, capsys):
    code, out = _plan(tmp_path, tiny_model_dir, "--save-result", "--result-dir", str(tmp_path / "res"))
    assert code == 0, capsys.readouterr().err
    report = capsys.readouterr().out
    config = Config.load(str(out))
    deploy = config.deploy
    devices = deploy.num_replicas if deploy.mode == "colocated" else deploy.num_prefill + deploy.num_decode
    assert devices <= 2 and config.model.device == "cpu" and config.model.max_model_len == 512
    assert config.parallel.tensor_parallel_size == 1
    for key in ("Placement:", "Chosen:", "Check:", "P:D ratio", "bottleneck", "Level 1"):
        assert key in report
    search = json.loads((tmp_path / "res" / "plan-search.json").read_text())
    assert search["units"][0]["per_device"] >= search["units"][-1]["per_device"]
    assert (tmp_path / "res" / "plan-attainment.png").exists()


@pytest.mark.parametrize("cluster, message", [
    ({**CLUSTER, "device_memory_gib": 0.00001}, "no parallel plan can run"),
    ({k: v for k, v in CLUSTER.items() if k != "nodes"}, "missing nodes"),
    ({**CLUSTER, "gpus_per_node": 8}, "unknown key"),
])
def test_bad_clusters_say_what_to_change(tmp_path, tiny_model_dir, capsys, cluster, message):
    code, _ = _plan(tmp_path, tiny_model_dir, cluster=cluster)
    assert code == 2 and message in capsys.readouterr().err


def test_malformed_yaml_unknown_architecture_and_impossible_slos(tmp_path, tiny_model_dir, capsys):
    latency, cluster = _inputs(tmp_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("nodes: [1, 2\n")
    base = ["--latency-model", latency, "--goodput", "ttft:300", "tpot:60", "--out", str(tmp_path / "p.yaml"),
            "--disable-tqdm", *WORKLOAD]
    assert plan_main(["--model", tiny_model_dir, "--cluster", str(broken), *base]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_layer": 2}))
    assert plan_main(["--model", str(gpt2), "--cluster", cluster, *base]) == 2
    assert "unsupported model architecture 'GPT2LMHeadModel'" in capsys.readouterr().err
    code, _ = _plan(tmp_path, tiny_model_dir, "--goodput", "ttft:0.01", "tpot:0.01")
    assert code == 2 and "no plan meets the SLOs" in capsys.readouterr().err
    assert plan_main(["--model", tiny_model_dir, "--cluster", cluster, *base[:2], "--goodput", "ttft:300"]) == 2
    assert "needs both SLOs" in capsys.readouterr().err


@pytest.mark.slow
def test_the_plan_starts_with_pdserve_serve(tmp_path, tiny_model_dir):
    # two "nodes" would get the Ray launcher (ray_address: auto); this box has no Ray cluster running
    code, out = _plan(tmp_path, tiny_model_dir, "--launcher", "local")
    assert code == 0
    deploy = Config.load(str(out)).deploy
    num_instances = deploy.num_replicas if deploy.mode == "colocated" else deploy.num_prefill + deploy.num_decode
    port = free_port()
    server = start_server(["--config", str(out)], port, tmp_path / "server.log", timeout_s=240)
    try:
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                           json={"model": tiny_model_dir, "prompt": "Hello", "max_tokens": 8, "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 8
        if num_instances > 1:  # every instance the plan asked for started (each logs it)
            log = (tmp_path / "server.log").read_text()
            assert log.count(") serving on ") == num_instances, log[-3000:]
    finally:
        stop_server(server)
