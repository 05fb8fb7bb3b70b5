"""--scheduling-policy vtc around the scheduler: its flags and YAML keys reach every engine (colocated,
replicas, prefill and decode instances), its per-client service reaches /metrics (through the instance
wire and the router's sum in disaggregated mode), and it changes no greedy output."""
from __future__ import annotations

import argparse
import json

import pytest

from scheduler import SamplingParams
from serving.cli import add_serve_args, config_from_args
from serving.config import Config
from serving.engine.protocol import EngineStats
from serving.metrics import MAX_CLIENT_SERIES, ServingMetrics, top_clients

MODEL = "m"


def parse(argv: list[str]) -> Config:
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    return config_from_args(parser.parse_args(argv))


# ---- configuration ----
def test_flags_reach_the_scheduler_config():
    config = parse(["--scheduling-policy", "vtc", "--fairness-prefill-weight", "0.5", "--fairness-decode-weight",
                    "3", "--fairness-update-interval", "4", "--fairness-preemption-threshold", "0",
                    "--client-weights", "alice:2,bob:1"])
    scheduler = config.scheduler
    assert (scheduler.scheduling_policy, scheduler.fairness_prefill_weight, scheduler.fairness_decode_weight,
            scheduler.fairness_update_interval, scheduler.fairness_preemption_threshold) == ("vtc", 0.5, 3.0, 4, 0.0)
    assert scheduler.client_weights == (("alice", 2.0), ("bob", 1.0))
    assert parse([]).scheduler.fairness_preemption_threshold is None  # the default: from max_model_len


def test_yaml_mapping_of_client_weights_and_every_engine_gets_them(tmp_path):
    from serving.instance.main import decode_start, encode_start
    from serving.launchers.base import make_specs

    path = tmp_path / "vtc.yaml"
    path.write_text("mode: disaggregated\n"
                    "scheduler:\n  scheduling_policy: vtc\n  client_weights: {alice: 2, bob: 0.5}\n"
                    "deploy:\n  decode_overrides: {fairness_decode_weight: 4}\n")
    config = Config.load(str(path))
    assert config.scheduler.client_weights == (("alice", 2.0), ("bob", 0.5))
    hash(config.scheduler)  # still a frozen, hashable dataclass
    for spec in make_specs(config):
        # what an instance (and an engine process) reads: JSON of Config.to_dict()
        received = decode_start(spec.name, spec.role, encode_start(spec)).config.scheduler
        assert received.scheduling_policy == "vtc" and received.client_weights == (("alice", 2.0), ("bob", 0.5))
        assert received.fairness_decode_weight == (4.0 if spec.role == "decode" else 2.0)
    replicas = Config.from_dict(json.loads(json.dumps(config.replace(mode="colocated", num_replicas=2).to_dict())))
    assert replicas.scheduler == config.scheduler


@pytest.mark.parametrize("argv, message", [
    (["--client-weights", "alice"], "--client-weights: 'alice' needs a client and a weight; e.g. --client-weights"),
    (["--client-weights", "alice:two"], "the weight of 'alice' is 'two', not a number"),
    (["--client-weights", "alice:0"], "the weight of 'alice' must be positive"),
    (["--client-weights", "a:1,a:2"], "'a' is given twice"),
    (["--fairness-update-interval", "0"], "--fairness-update-interval must be a whole number of steps, at least 1"),
    (["--fairness-preemption-threshold", "-1"], "--fairness-preemption-threshold must be a number of weighted tokens, "
                                                "at least 0 \\(0: never preempt for fairness\\)"),
    (["--fairness-decode-weight", "-2"], "--fairness-decode-weight must be a number of at least 0"),
    (["--fairness-prefill-weight", "0", "--fairness-decode-weight", "0"], "make at least one positive"),
])
def test_bad_fairness_settings_say_what_to_change(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(argv)


def test_the_cli_offers_every_registered_policy(capsys):
    with pytest.raises(SystemExit):
        parse(["--scheduling-policy", "lottery"])
    err = capsys.readouterr().err.replace("'", "")  # Python versions differ in quoting the choices
    assert "invalid choice: lottery (choose from fcfs, priority, vtc)" in err


# ---- metrics ----
def test_client_service_is_a_gauge_per_client_capped_with_other():
    metrics = ServingMetrics(MODEL, 128)
    service = {f"c{i:02d}": float(i) for i in range(40)}
    metrics.observe_engine_stats(EngineStats(extra={"client_service": service}))
    name = "pdserve:client_service_tokens"

    def sample(client):
        return metrics.registry.get_sample_value(name, {"model_name": MODEL, "client": client})

    assert sample("c39") == 39.0 and sample("c08") == 8.0  # the 32 with the most service
    assert sample("c07") is None and sample("other") == sum(range(8))  # the rest, summed
    assert len(top_clients(service, MAX_CLIENT_SERIES)) == MAX_CLIENT_SERIES + 1
    # a client really called "other" shares the label with the rest instead of a duplicate series
    assert dict(top_clients({"other": 5.0, "a": 9.0, "b": 1.0}, 2)) == {"a": 9.0, "other": 6.0}
    metrics = ServingMetrics(MODEL, 128)
    metrics.observe_engine_stats(EngineStats())
    assert name not in metrics.render().decode()  # fcfs and priority count nothing: no family


def test_client_service_crosses_the_instance_wire_and_is_summed_over_instances():
    from serving.instance import wire
    from serving.instance._proto import instance_pb2 as pb
    from serving.router.stats import aggregate_stats

    class State:  # what the router's pool keeps per instance
        def __init__(self, name, role, service):
            self.name, self.role, self.up, self.num_restarts = name, role, True, 0
            stats = wire.stats_to_proto(EngineStats(extra={"client_service": service}))
            self.stats = pb.StatsResponse.FromString(stats.SerializeToString())

    stats = aggregate_stats([State("prefill-0", "prefill", {"a": 100.0, "b": 40.0}),
                             State("decode-0", "decode", {"a": 20.0, "c": 2.0})], {})
    assert stats.extra["client_service"] == {"a": 120.0, "b": 40.0, "c": 2.0}


# ---- the engine ----
PROMPTS = ["hello there", "The quick brown fox jumps over the lazy dog", "1 2 3 4 5 6 7 8 9",
           "import os\nimport sys\n", "a b c d e f g", "Once upon a time " * 3, "x y", "What is 2 + 2?"]


def _generate(model_dir: str, **config) -> tuple[dict[str, list[int]], EngineStats]:
    """Greedy outputs of PROMPTS sent by three clients, in a pool small enough to preempt."""
    from serving.llm import LLM

    llm = LLM(model_dir, max_num_batched_tokens=32, block_size=4, num_blocks_override=40, max_model_len=128,
              enable_prefix_caching=False, **config)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", llm.tokenizer.encode(prompt), params, client_id=f"client-{i % 3}")
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).extend(output.new_token_ids)
        engine.check_integrity()
    assert engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks
    return outputs, engine.get_stats()


def test_greedy_output_is_the_same_under_vtc_and_fcfs(tiny_model_dir):
    fcfs, fcfs_stats = _generate(tiny_model_dir, scheduling_policy="fcfs")
    vtc, vtc_stats = _generate(tiny_model_dir, scheduling_policy="vtc", fairness_preemption_threshold=1.0)
    assert vtc == fcfs and len(vtc) == len(PROMPTS) and all(len(tokens) == 16 for tokens in vtc.values())
    assert fcfs_stats.num_preemptions > 0 and vtc_stats.num_preemptions > 0  # recomputed, same tokens
    assert fcfs_stats.extra["client_service"] == {}
    service = vtc_stats.extra["client_service"]
    assert set(service) == {"client-0", "client-1", "client-2"}
    assert sum(service.values()) > 2.0 * 16 * len(PROMPTS)  # outputs x 2, plus the prompts


def test_client_service_crosses_the_engine_process_boundary():
    from serving.engine import core_messages as m

    stats = EngineStats(num_running=1, extra={"client_service": {"alice": 12.5, "": 3.0}})
    assert m.decode_stats(m.unpack(m.outputs_message([], stats))[2]) == stats


def test_the_engine_process_schedules_with_vtc_and_reports_service(tiny_model_dir):
    import asyncio

    from serving.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_config(Config().replace(model=tiny_model_dir, scheduling_policy="vtc",
                                                client_weights="alice:2", fairness_update_interval=3))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    async def run():
        async def one(request_id, client):
            return [t async for o in llm.generate(request_id, [5, 6, 7, 8], params, client_id=client)
                    for t in o.new_token_ids]
        try:
            outputs = await asyncio.gather(one("r0", "alice"), one("r1", "bob"))
            ordering = await llm.call(lambda engine: (type(engine.scheduler.ordering).__name__,
                                                      engine.scheduler.ordering.client_weights,
                                                      engine.scheduler.ordering.update_interval))
            await llm.refresh_stats()
            return outputs, ordering, llm.get_stats().extra["client_service"]
        finally:
            await llm.shutdown()

    outputs, ordering, service = asyncio.run(asyncio.wait_for(run(), 180))
    assert outputs[0] == outputs[1] and len(outputs[0]) == 4
    assert ordering == ("VtcOrdering", {"alice": 2.0}, 3)
    assert service == {"alice": pytest.approx((4 + 2 * 4) / 2), "bob": pytest.approx(4 + 2 * 4)}


@pytest.mark.slow
def test_disaggregated_instances_schedule_with_vtc_and_metrics_sum_them(tiny_model_dir):
    import httpx

    from serving.api import build_app
    from serving.config import ServerConfig
    from serving.router.engine_client import build_disaggregated_client
    from tests.serving.test_disagg_support import LoopThread, tiny_config

    config = tiny_config(tiny_model_dir, mode="disaggregated", scheduling_policy="vtc",
                         client_weights={"alice": 2})
    loop = LoopThread()
    client = build_disaggregated_client(config)

    async def run():
        app = build_app(client, ServerConfig())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            for user in ("alice", "bob"):
                body = {"model": client.model_info.name, "prompt": [5, 6, 7, 8], "max_tokens": 6,
                        "temperature": 0, "ignore_eos": True, "user": user}
                assert (await http.post("/v1/completions", json=body)).status_code == 200
            return (await http.get("/metrics")).text

    try:
        text = loop.run(run())
    finally:
        loop.run(client.shutdown())
        loop.close()
    values = {line.split('client="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line.startswith("pdserve:client_service_tokens{")}
    # prefill-0: the prompt and the first token; decode-0: the other five; alice's over her weight 2
    assert values == {"alice": pytest.approx((4 + 2 * 6) / 2), "bob": pytest.approx(4 + 2 * 6)}
