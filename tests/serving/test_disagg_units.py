"""Disaggregation pieces in one process: wire conversions, deployment configs, the peer check, the
router's choice of instances, and the KV connector of both roles moving real KV over real gRPC
(localhost)."""
from __future__ import annotations

import asyncio
import glob
import os
import time

import pytest
import torch

from kvcache.transfer import TransferConfig
from kvcache.transfer._proto import kv_transfer_pb2 as kv_pb
from kvcache.transfer.layout import KVLayout
from scheduler.sampling_params import SamplingParams
from scheduler.step import KVSend
from serving.config import Config, DeployConfig
from serving.disagg import wire
from serving.disagg._proto import instance_pb2 as pb
from serving.disagg.connector import DecodeConnector, PrefillConnector, model_fingerprint
from serving.disagg.instance import InstanceSpec
from serving.disagg.kv_receives import KVReceives
from serving.disagg.launcher import LaunchedInstance, make_specs
from serving.disagg.pool import InstancePool
from serving.disagg.router import check_peers
from serving.engine.protocol import RequestOutput, TokenLogprob

DEPLOY_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "deploy")


# ---- wire ----
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
    SamplingParams(temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, seed=-3, max_tokens=None, min_tokens=2,
                   stop=["\n", "end"], stop_token_ids=[3, 4], include_stop_str_in_output=True, logprobs=0,
                   presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2,
                   skip_special_tokens=False),
])
def test_sampling_params_round_trip(params):
    assert wire.params_from_proto(pb.SamplingParams.FromString(
        wire.params_to_proto(params).SerializeToString())) == params


def test_sampling_params_refuse_n_above_one():
    with pytest.raises(ValueError, match="expand n"):
        wire.params_to_proto(SamplingParams(n=2))


@pytest.mark.parametrize("output", [
    RequestOutput("a", [5], "", finished=False, num_prompt_tokens=3, num_output_tokens=1, queue_time_s=0.25),
    RequestOutput("b", [7], "", finished=True, finish_reason="stop", stop_reason=7, num_prompt_tokens=3,
                  num_output_tokens=4, num_cached_tokens=2,
                  new_logprobs=[TokenLogprob(7, -0.5, [(7, -0.5), (9, -1.25)])]),
    RequestOutput("c", [], "", finished=True, finish_reason="stop", stop_reason="end", new_logprobs=[]),
    RequestOutput("d", [], "", finished=True, finish_reason="error", error="boom"),
])
def test_request_output_round_trip(output):
    message = pb.GenerateOutput.FromString(wire.output_to_proto(output).SerializeToString())
    assert wire.output_from_proto(message) == output


# ---- deployment configs ----
@pytest.mark.parametrize("path", sorted(p for p in glob.glob(os.path.join(DEPLOY_DIR, "*.yaml"))
                                        if not p.endswith("ray-cluster.yaml")))
def test_deploy_yaml_is_a_valid_config(path):
    config = Config.load(path)
    assert config.deploy.mode in ("colocated", "disaggregated")
    for spec in make_specs(config):  # the per-role overrides apply cleanly too
        assert spec.config.deploy == config.deploy


def test_deploy_dir_has_every_example():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(DEPLOY_DIR, "*.yaml"))}
    assert {"ray-cluster.yaml", "colocated.yaml", "1p1d.yaml", "xpyd.yaml"} <= names


def test_ray_cluster_yaml_has_what_ray_up_needs():
    import yaml
    with open(os.path.join(DEPLOY_DIR, "ray-cluster.yaml")) as f:
        cluster = yaml.safe_load(f)
    assert {"cluster_name", "provider", "head_start_ray_commands", "worker_start_ray_commands"} <= set(cluster)


def test_specs_apply_role_overrides():
    config = Config.from_dict({"deploy": {"mode": "disaggregated", "num_prefill": 2, "num_decode": 3,
                                          "prefill_overrides": {"max-num-batched-tokens": 4096},
                                          "decode_overrides": {"max_num_seqs": 7}}})
    specs = make_specs(config)
    assert [s.name for s in specs] == ["prefill-0", "prefill-1", "decode-0", "decode-1", "decode-2"]
    assert {s.config.scheduler.max_num_batched_tokens for s in specs if s.role == "prefill"} == {4096}
    assert {s.config.scheduler.max_num_seqs for s in specs if s.role == "decode"} == {7}
    assert {s.config.scheduler.max_num_seqs for s in specs if s.role == "prefill"} == {128}


@pytest.mark.parametrize("deploy, message", [
    ({"prefill_overrides": {"port": 9}}, "may differ per role"),
    ({"decode_overrides": ["max_num_seqs"]}, "must be a mapping"),
    ({"kv_transfer_failure_policy": "retry"}, "recompute or fail"),
    ({"instance_timeout_s": 0}, "--instance-timeout-s must be positive"),
    ({"kv_transfer_layers_per_group": 0}, "at least 1"),
])
def test_deploy_config_errors_say_what_to_change(deploy, message):
    with pytest.raises(ValueError, match=message):
        Config.from_dict({"deploy": deploy})


# ---- the peer check the router runs before serving ----
def _launched(name: str, role: str, block_size: int, fingerprint: str = "f") -> LaunchedInstance:
    layout = KVLayout(fingerprint, "float32", block_size, 4, 2, 32)
    info = pb.InstanceInfo(name=name, role=role, kv_layout=layout.to_proto().SerializeToString())
    return LaunchedInstance(InstanceSpec(name, role, Config()), "127.0.0.1:1", info)


def test_incompatible_peers_are_refused_naming_the_field():
    prefill, decode = _launched("prefill-0", "prefill", 8), _launched("decode-0", "decode", 16)
    with pytest.raises(ValueError, match="prefill instance prefill-0 cannot send KV to decode instance decode-0"
                       ) as error:
        check_peers(prefill, [prefill, decode])
    assert "block_size: prefill=8 decode=16" in str(error.value)
    check_peers(decode, [decode, _launched("prefill-1", "prefill", 16)])  # same layout: fine


def test_router_picks_by_queued_prompt_tokens_then_free_blocks_and_running_count():
    async def run():
        launched = [_launched("prefill-0", "prefill", 16), _launched("prefill-1", "prefill", 16),
                    _launched("decode-0", "decode", 16), _launched("decode-1", "decode", 16)]
        pool = InstancePool(launched, launcher=None, deploy=DeployConfig(), check_peer=None,
                            counters={"num_instance_failures": 0, "num_instance_restarts": 0})
        prefill0, prefill1, decode0, decode1 = pool.instances
        prefill0.num_queued_prefill_tokens, prefill1.num_queued_prefill_tokens = 100, 40
        assert pool.pick_prefill() is prefill1
        prefill1.up = False
        assert pool.pick_prefill() is prefill0
        decode0.stats.num_free_blocks = decode1.stats.num_free_blocks = 50
        decode0.num_active, decode1.num_active = 3, 1
        assert pool.decode_candidates() == [decode1, decode0]  # equal room: fewer running first
        decode0.stats.num_free_blocks = 60
        assert pool.decode_candidates() == [decode0, decode1]  # more free blocks first
        decode0.num_blocks_reserved_since_poll = 20  # reserved by the router since the last poll
        assert pool.decode_candidates() == [decode1, decode0]
        decode1.up = False
        assert pool.decode_candidates() == [decode0]
        await pool.close()
    asyncio.run(run())


def test_model_fingerprint_tells_weights_apart(tiny_model_dir, tmp_path):
    from serving.models.make_model import make_model
    other = make_model("tiny", str(tmp_path / "other"), seed=1)
    assert model_fingerprint(tiny_model_dir) == model_fingerprint(tiny_model_dir)
    assert model_fingerprint(tiny_model_dir) != model_fingerprint(other)


# ---- the decode side's bookkeeping ----
class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _receives(policy: str = "recompute") -> tuple[KVReceives, _Clock]:
    clock = _Clock()
    receives = KVReceives(TransferConfig(stall_timeout_s=5.0, failure_policy=policy), clock)
    receives._block_size = 4  # as start() would set from the layout
    return receives, clock


def test_receives_lend_only_expected_blocks_once():
    receives, _ = _receives()
    assert receives.reserve("r", 5) is None  # never expected (e.g. aborted already)
    receives.expect("r", [7, 3, 9])
    assert receives.reserve("r", 13) is None  # more blocks than the engine reserved
    assert receives.reserve("r", 5) == [7, 3]  # prompt only: the first token's slot is not sent
    assert receives.reserve("r", 5) is None  # lent already
    receives.on_transfer_complete("r")
    assert receives.poll().finished_recving == ["r"]
    assert receives.poll().finished_recving == []


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_receives_failures_follow_the_policy(policy):
    receives, _ = _receives(policy)
    receives.expect("r", [1])
    receives.reserve("r", 2)
    receives.release("r")
    receives.on_transfer_failed("r", "stalled")
    events = receives.poll()
    if policy == "recompute":
        assert events.failed_recving == ["r"] and receives.take_failed() == []
        assert receives.counter_values()["num_recompute_fallbacks"] == 1
    else:
        assert events.failed_recving == [] and receives.take_failed() == ["r"]
        assert receives.counter_values()["num_failed_by_policy"] == 1


def test_receives_give_up_when_no_kv_follows_the_first_token():
    receives, clock = _receives()
    receives.expect("r", [1])
    clock.now += 60  # waiting for the prefill itself has no deadline here (the router bounds it)
    assert receives.poll().failed_recving == []
    receives.first_token_arrived("r")
    clock.now += 4
    assert receives.poll().failed_recving == []
    clock.now += 2
    assert receives.poll().failed_recving == ["r"]
    assert receives.counter_values()["num_never_sent"] == 1


# ---- both connectors over real gRPC ----
NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 4, 16, 16, 2, 32


def _kv_cache(block_size: int = BLOCK_SIZE, fill: bool = True) -> torch.Tensor:
    shape = (NUM_LAYERS, 2, NUM_BLOCKS, block_size, NUM_KV_HEADS, HEAD_DIM)
    return torch.randn(shape) if fill else torch.zeros(shape)


def _connectors(model_dir: str, prefill_block_size: int = BLOCK_SIZE, **deploy):
    config = Config.from_dict({"deploy": {"kv_transfer_rpc_timeout_s": 5.0, "kv_transfer_layers_per_group": 2,
                                          **deploy}})
    prefill, decode = PrefillConnector(config), DecodeConnector(config)
    prefill_cache, decode_cache = _kv_cache(prefill_block_size), _kv_cache(fill=False)
    prefill.bind(prefill_cache, model_dir)
    decode.bind(decode_cache, model_dir)
    address = decode.start_receiver("127.0.0.1")
    return prefill, decode, prefill_cache, decode_cache, address


def _poll_until(connector, field: str, request_id: str, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if request_id in getattr(connector.poll(), field):
            return
        time.sleep(0.01)
    raise AssertionError(f"{request_id} never showed up in {field}")


def _send_step(prefill: PrefillConnector, send: KVSend) -> None:
    """What the runner does in the step that finishes the prompt: begin, then layer groups."""
    prefill.begin_sends(None, [send])
    for start, end in prefill.layer_groups(NUM_LAYERS, send.num_tokens):
        prefill.layers_done(start, end)


def test_connectors_move_the_prompt_kv_layer_group_by_group(tiny_model_dir):
    prefill, decode, prefill_cache, decode_cache, address = _connectors(tiny_model_dir)
    try:
        assert prefill.layer_groups(NUM_LAYERS, 10) == [(0, 2), (2, 4)]
        src, dst = [5, 2, 11], [9, 0, 4, 13]  # the decode side reserved prompt + 1 tokens
        decode.expect_recv("r", dst)
        _send_step(prefill, KVSend("r", src, 40, address))
        _poll_until(decode, "finished_recving", "r")
        _poll_until(prefill, "finished_sending", "r")
        torch.testing.assert_close(decode_cache[:, :, dst[:3]], prefill_cache[:, :, src], rtol=0, atol=0)
        assert not decode_cache[:, :, dst[3]].any()  # the first token's block is the decode side's
        assert prefill.counters()["num_transfers_sent"] == 1
        num_bytes = 3 * NUM_LAYERS * 2 * BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * 4  # 3 blocks, float32
        assert decode.counters()["num_bytes_received"] == num_bytes
    finally:
        prefill.close()
        decode.close()


def test_an_aborted_receive_never_writes_blocks_given_back(tiny_model_dir):
    prefill, decode, _, decode_cache, address = _connectors(tiny_model_dir, kv_transfer_max_retries=1)
    try:
        decode.expect_recv("r", [3, 4])
        prefill.begin_sends(None, [KVSend("r", [1, 2], 20, address)])
        deadline = time.monotonic() + 20
        while not decode.receives._expected.get("r", None) or not decode.receives._expected["r"].lent:
            assert time.monotonic() < deadline, "the Reserve never arrived"
            time.sleep(0.01)
        decode.cancel_recvs(["r"])  # the engine aborts the request: returns once nothing writes
        for start, end in prefill.layer_groups(NUM_LAYERS, 20):
            prefill.layers_done(start, end)  # late chunks: refused, the retry finds nothing to lend
        _poll_until(prefill, "failed_sending", "r")
        assert not decode_cache.any()
        assert decode.poll().failed_recving == []  # aborted, not failed: nothing to recompute
    finally:
        prefill.close()
        decode.close()


def test_a_sender_with_another_layout_is_refused(tiny_model_dir, caplog):
    prefill, decode, _, decode_cache, address = _connectors(tiny_model_dir, prefill_block_size=8)
    try:
        decode.expect_recv("r", [3, 4])
        with caplog.at_level("ERROR"):
            _send_step(prefill, KVSend("r", [1, 2, 5], 20, address))
            _poll_until(prefill, "failed_sending", "r")
        assert "block_size: prefill=8 decode=16" in caplog.text
        assert not decode_cache.any()
    finally:
        prefill.close()
        decode.close()


def test_instance_info_carries_a_layout_the_router_can_read(tiny_model_dir):
    config = Config.from_dict({"model": tiny_model_dir})
    connector = DecodeConnector(config)
    connector.bind(_kv_cache(fill=False), tiny_model_dir)
    layout = KVLayout.from_proto(kv_pb.KVLayout.FromString(connector.layout.to_proto().SerializeToString()))
    assert (layout.block_size, layout.num_layers, layout.dtype) == (BLOCK_SIZE, NUM_LAYERS, "float32")
