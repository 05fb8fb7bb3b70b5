"""Disaggregation pieces in one process: wire conversions, deployment configs, the peer check, the
router's choice of instances, and the KV connector of both roles moving real KV over real gRPC
(localhost)."""
from __future__ import annotations

import asyncio
import glob
import os
import time

import grpc
import pytest
import torch

from kvcache.transfer import TransferConfig
from kvcache.transfer._proto import kv_transfer_pb2 as kv_pb
from kvcache.transfer.layout import KVLayout
from kvcache.transfer.reservation import NotRegisteredYet
from scheduler.engine_core import EngineCoreOutput
from scheduler.kv_moves import ACTIVE, FAILED, FINISHED, STARTED, CancelKV, RecvKV, SendKV
from scheduler.sampling_params import SamplingParams
from serving.config import Config, DeployConfig
from serving.instance import wire
from serving.instance._proto import instance_pb2 as pb
from serving.instance.servicer import InstanceSpec
from serving.launchers import LaunchedInstance, make_specs
from serving.router.pool import InstancePool
from serving.router.engine_client import check_peers
from serving.engine.protocol import TokenLogprob
from serving.kv_connector import receives as receives_module
from serving.kv_connector.receives import KVReceives
from serving.kv_connector.transfer import TransferWorker, model_fingerprint

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


def test_generate_request_carries_who_the_request_serves():
    message = pb.GenerateRequest.FromString(wire.generate_request(
        "r", [1, 2], SamplingParams(max_tokens=3), kv_peer="d:1", client_id="alice", priority=4).SerializeToString())
    assert wire.request_kwargs(message) == {"client_id": "alice", "priority": 4, "kv_peer": "d:1",
                                            "remote_prefill": False}
    assert list(message.prompt_token_ids) == [1, 2]


def test_the_router_sends_client_id_and_priority_to_both_instances():
    """A flow over a pool whose instance clients record the Generate calls they are asked for."""
    from serving.router.flow import RequestFlow

    calls = []

    class Recorder:
        def __init__(self, role):
            self.role = role

        def generate(self, request_id, prompt, params, **kwargs):
            calls.append((self.role, kwargs.get("client_id"), kwargs.get("priority")))
            raise RuntimeError("recorded")  # the flow gives up here; only the call matters

        async def close(self):
            pass

    async def run():
        launched = [_launched("prefill-0", "prefill", 16), _launched("decode-0", "decode", 16)]
        pool = InstancePool(launched, launcher=None, deploy=DeployConfig(), check_peer=None,
                            counters={"num_instance_failures": 0, "num_instance_restarts": 0})
        for state in pool.instances:
            state.client = Recorder(state.role)
        class Tokenizer:  # the flow's detokenizer only decodes
            def decode(self, ids, skip_special_tokens=True):
                return ""
        flow = RequestFlow(pool, Tokenizer(), DeployConfig(), "r", [1, 2, 3], SamplingParams(max_tokens=2),
                           {"num_reroutes": 0, "num_decode_failures": 0, "num_reprefills": 0, "num_kv_waits": 0,
                            "num_early_prefills_cancelled": 0},
                           client_id="alice", priority=5)
        with pytest.raises(RuntimeError, match="recorded"):
            async for _ in flow.outputs():
                pass
        with pytest.raises(RuntimeError, match="recorded"):
            await flow._open_prefill("r@0", [1, 2, 3], SamplingParams(max_tokens=2), pool.instances[1])
        await pool.close()
    asyncio.run(run())
    assert calls == [("decode", "alice", 5), ("prefill", "alice", 5)]


class _ScriptedCall:
    """A Generate call whose messages the test puts in; records its cancellation."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    async def read(self):
        message = await self.messages.get()
        if isinstance(message, BaseException):
            raise message
        return message

    def cancel(self) -> None:
        self.cancelled = True


class _ScriptedInstance:
    """An instance client that hands each Generate call to the test (role, kwargs, call)."""

    def __init__(self, role: str, opened: asyncio.Queue) -> None:
        self.role, self.opened, self.first_tokens = role, opened, []
        self.request_ids, self.first_token_ids = [], []  # the ids Generate and the first token came with

    def generate(self, request_id, prompt, params, **kwargs):
        call = _ScriptedCall()
        self.request_ids.append(request_id)
        self.opened.put_nowait((self.role, kwargs, call))
        return call

    async def set_first_token(self, request_id, token_id):
        self.first_tokens.append(token_id)
        self.first_token_ids.append(request_id)

    async def close(self):
        pass


def _output(token_ids, finished=False, finish_reason=None, accepted=False):
    return wire.output_to_proto(EngineCoreOutput("r@0", token_ids, finished=finished, finish_reason=finish_reason,
                                                 accepted=accepted))


def _scripted_flow(deploy: DeployConfig, num_decode: int = 1, free_blocks: int = 100):
    from serving.router.flow import RequestFlow

    launched = [_launched("prefill-0", "prefill", 16)] + [_launched(f"decode-{i}", "decode", 16)
                                                          for i in range(num_decode)]
    counters = {"num_instance_failures": 0, "num_instance_restarts": 0, "num_reroutes": 0, "num_decode_failures": 0,
                "num_reprefills": 0, "num_kv_waits": 0, "num_early_prefills_cancelled": 0,
                "num_kv_transferred": 0, "num_kv_recomputed": 0}
    pool = InstancePool(launched, launcher=None, deploy=deploy, check_peer=None, counters=counters)
    opened: asyncio.Queue = asyncio.Queue()
    for state in pool.instances:
        state.client = _ScriptedInstance(state.role, opened)
        state.stats.num_free_blocks = free_blocks
        state.launched.info.kv_address = f"{state.name}-kv"

    class Tokenizer:
        def decode(self, ids, skip_special_tokens=True):
            return ""
    flow = RequestFlow(pool, Tokenizer(), deploy, "r", list(range(40)), SamplingParams(max_tokens=2), counters)
    return flow, pool, opened, counters


async def _collect(flow) -> list:
    return [output async for output in flow.outputs()]


def test_the_prefill_starts_while_the_decode_instance_reserves():
    """The decode instance answers its reservation only after the prefill has been asked for (it would
    wait for ever if the router waited for the answer first)."""
    async def run():
        flow, pool, opened, counters = _scripted_flow(DeployConfig())
        outputs = asyncio.ensure_future(_collect(flow))
        role, kwargs, decode_call = await asyncio.wait_for(opened.get(), 5)
        assert role == "decode" and kwargs["remote_prefill"]
        role, kwargs, prefill_call = await asyncio.wait_for(opened.get(), 5)  # before any answer from decode
        assert role == "prefill" and kwargs["kv_peer"] == pool.instances[1].kv_address
        assert pool.instances[0].num_queued_prefill_tokens == 40
        prefill_call.messages.put_nowait(_output([5], finished=True, finish_reason="remote_decode"))
        await asyncio.sleep(0.05)
        assert not outputs.done()  # the first token waits for the reservation: D must hold the blocks first
        decode_call.messages.put_nowait(_output([], accepted=True))
        decode_call.messages.put_nowait(_output([6], finished=True, finish_reason="length"))
        results = await asyncio.wait_for(outputs, 5)
        assert [t for o in results for t in o.new_token_ids] == [5, 6] and results[-1].finished
        assert pool.instances[1].client.first_tokens == [5]
        assert pool.instances[0].num_queued_prefill_tokens == 0 and counters["num_early_prefills_cancelled"] == 0
        await pool.close()
    asyncio.run(run())


def test_a_refused_reservation_cancels_the_early_prefill_and_prefills_for_the_decode_that_accepts():
    async def run():
        flow, pool, opened, counters = _scripted_flow(DeployConfig(), num_decode=2)
        outputs = asyncio.ensure_future(_collect(flow))
        role, _, first_decode = await asyncio.wait_for(opened.get(), 5)
        role, kwargs, early = await asyncio.wait_for(opened.get(), 5)
        assert role == "prefill"
        first_decode.messages.put_nowait(grpc.aio.AioRpcError(  # that decode instance has no room after all
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), "no free KV blocks"))
        role, _, second_decode = await asyncio.wait_for(opened.get(), 5)
        assert role == "decode" and early.cancelled  # the prefill sending to the refusing instance is aborted
        assert counters["num_early_prefills_cancelled"] == 1
        role, kwargs2, prefill = await asyncio.wait_for(opened.get(), 5)
        assert role == "prefill" and (kwargs["kv_peer"], kwargs2["kv_peer"]) == ("decode-0-kv", "decode-1-kv")
        second_decode.messages.put_nowait(_output([], accepted=True))
        prefill.messages.put_nowait(_output([5], finished=True, finish_reason="remote_decode"))
        second_decode.messages.put_nowait(_output([6], finished=True, finish_reason="length"))
        results = await asyncio.wait_for(outputs, 5)
        assert [t for o in results for t in o.new_token_ids] == [5, 6] and results[-1].finished
        assert pool.instances[0].num_queued_prefill_tokens == 0
        # the second attempt under an id of its own: the prefill instance may still hold the first
        assert pool.instances[0].client.request_ids == ["r@0", "r@0.1"]
        assert pool.instances[1].client.request_ids == ["r@0"]
        assert pool.instances[2].client.request_ids == pool.instances[2].client.first_token_ids == ["r@0.1"]
        await pool.close()
    asyncio.run(run())


def test_a_reservation_retried_after_waiting_for_room_has_a_fresh_id():
    """One decode instance, out of room at first: the retry after the backoff must not reuse the id the
    refused attempt gave both instances (they drop it asynchronously; a duplicate id is refused, and the
    client got a 400 for a request that only had to wait)."""
    async def run():
        flow, pool, opened, counters = _scripted_flow(DeployConfig())
        outputs = asyncio.ensure_future(_collect(flow))
        for attempt in range(2):
            role, _, decode_call = await asyncio.wait_for(opened.get(), 5)
            assert role == "decode"
            role, _, early = await asyncio.wait_for(opened.get(), 5)
            assert role == "prefill"
            decode_call.messages.put_nowait(grpc.aio.AioRpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), "no free KV blocks"))
        role, _, decode_call = await asyncio.wait_for(opened.get(), 5)
        role, _, prefill = await asyncio.wait_for(opened.get(), 5)
        decode_call.messages.put_nowait(_output([], accepted=True))
        prefill.messages.put_nowait(_output([5], finished=True, finish_reason="remote_decode"))
        decode_call.messages.put_nowait(_output([6], finished=True, finish_reason="length"))
        results = await asyncio.wait_for(outputs, 5)
        assert [t for o in results for t in o.new_token_ids] == [5, 6]
        ids = ["r@0", "r@0.1", "r@0.2"]
        assert pool.instances[0].client.request_ids == pool.instances[1].client.request_ids == ids
        assert pool.instances[1].client.first_token_ids == ["r@0.2"]
        assert counters["num_kv_waits"] == 2 and counters["num_early_prefills_cancelled"] == 2
        await pool.close()
    asyncio.run(run())


@pytest.mark.parametrize("deploy, free_blocks", [(DeployConfig(prefill_while_reserving=False), 100),
                                                 (DeployConfig(), 3)])
def test_the_prefill_waits_for_the_reservation_when_switched_off_or_short_of_blocks(deploy, free_blocks):
    """40 prompt tokens + 1 need 3 blocks of 16: with 3 free the estimate is enough, with fewer not."""
    async def run():
        flow, pool, opened, counters = _scripted_flow(deploy, free_blocks=free_blocks - (free_blocks == 3))
        outputs = asyncio.ensure_future(_collect(flow))
        role, _, decode_call = await asyncio.wait_for(opened.get(), 5)
        await asyncio.sleep(0.05)
        assert role == "decode" and opened.empty()  # no prefill before the answer
        decode_call.messages.put_nowait(_output([], accepted=True))
        role, _, prefill_call = await asyncio.wait_for(opened.get(), 5)
        assert role == "prefill"
        prefill_call.messages.put_nowait(_output([5], finished=True, finish_reason="remote_decode"))
        decode_call.messages.put_nowait(_output([6], finished=True, finish_reason="length"))
        await asyncio.wait_for(outputs, 5)
        await pool.close()
    asyncio.run(run())


def test_sampling_params_refuse_n_above_one():
    with pytest.raises(ValueError, match="expand n"):
        wire.params_to_proto(SamplingParams(n=2))


@pytest.mark.parametrize("output", [
    EngineCoreOutput("a", [5], finished=False, num_prompt_tokens=3, num_output_tokens=1, queue_time_s=0.25),
    EngineCoreOutput("b", [7], finished=True, finish_reason="stop", stop_reason=7, num_prompt_tokens=3,
                     num_output_tokens=4, num_cached_tokens=2,
                     new_logprobs=[TokenLogprob(7, -0.5, [(7, -0.5), (9, -1.25)])]),
    EngineCoreOutput("c", [], finished=True, finish_reason="stop", stop_reason="end", new_logprobs=[]),
    EngineCoreOutput("d", [], finished=True, finish_reason="error", error="boom"),
    EngineCoreOutput("e", [], accepted=True, num_prompt_tokens=9),
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
    assert {"ray-cluster.yaml", "colocated.yaml", "colocated-tp2.yaml", "1p1d.yaml", "1p1d-tp.yaml", "xpyd.yaml"} <= names


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
    info = pb.InstanceInfo(name=name, role=role, kv_layout=layout.to_proto().SerializeToString(),
                           block_size=block_size)
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


# ---- the decode side's worker bookkeeping ----
def _receives() -> KVReceives:
    receives = KVReceives(TransferConfig(stall_timeout_s=5.0))
    receives._block_size = 4  # as start_server() would set from the layout
    return receives


def _states(results, request_id="r"):
    return [(r.kind, r.state) for r in results if r.request_id == request_id]


def test_receives_lend_only_expected_blocks_once():
    receives = _receives()
    with pytest.raises(NotRegisteredYet):  # not registered yet: the sender asks again
        receives.reserve("r", 5)
    receives.expect("r", [7, 3, 9])
    assert _states(receives.poll()) == [("recv", STARTED)]
    assert receives.reserve("r", 13) is None  # more blocks than the engine reserved
    assert receives.reserve("r", 5) == [7, 3]  # prompt only: the first token's slot is not sent
    assert receives.reserve("r", 5) is None  # lent already
    receives.on_transfer_complete("r", first_token_id=42)
    results = receives.poll()
    assert _states(results) == [("recv", ACTIVE), ("recv", FINISHED)] and results[-1].first_token_id == 42
    assert receives.poll() == []
    assert receives.reserve("r", 5) is None  # received already: refused, not "ask again"


def test_receives_refuse_at_once_what_ended_and_forget_only_the_oldest(monkeypatch):
    monkeypatch.setattr(receives_module, "_ENDED_MEMORY", 2)
    receives = _receives()
    for request_id in ("a", "b", "c"):
        receives.expect(request_id, [1])
        receives.cancel(request_id, "aborted")
    assert receives.reserve("b", 2) is None and receives.reserve("c", 2) is None
    with pytest.raises(NotRegisteredYet):  # the oldest was forgotten: a sender would wait for it
        receives.reserve("a", 2)


def test_receives_report_a_dropped_transfer_as_failed():
    receives = _receives()
    receives.expect("r", [1])
    receives.reserve("r", 2)
    receives.release("r")
    receives.on_transfer_failed("r", "stalled")
    results = receives.poll()
    assert _states(results) == [("recv", STARTED), ("recv", ACTIVE), ("recv", FAILED)]
    assert results[-1].reason == "stalled"


def test_receives_cancel_before_any_reserve_fails_at_once():
    receives = _receives()
    receives.expect("r", [1, 2])
    receives.cancel("r", "the request was aborted")
    assert receives.reserve("r", 5) is None  # a Reserve that comes later finds nothing
    assert _states(receives.poll()) == [("recv", STARTED), ("recv", FAILED)]


class _Receiver:
    """Stands in for the KVReceiver: records drops; finds the reservation only once `recorded`."""

    def __init__(self) -> None:
        self.recorded, self.drops = False, []

    def drop(self, request_id, reason, routine=False):
        self.drops.append(request_id)
        return self.recorded


def test_receives_cancel_while_lent_does_not_wait_and_fails_once_the_receiver_lets_go(monkeypatch):
    """The engine thread is not held while a copy (or a stopped one-sided writer) still holds the
    blocks: the receive is reported failed, with the cancel's reason, exactly once it let go."""
    import serving.kv_connector.receives as receives_module
    monkeypatch.setattr(receives_module, "_RECORD_WAIT_S", 0.05)
    receives, receiver = _receives(), _Receiver()
    receives._server = type("Server", (), {"receiver": receiver})()
    receives.expect("r", [1, 2])
    receives.reserve("r", 5)
    started = time.monotonic()
    receives.cancel("r", "the client went away")  # the reservation is not recorded yet: asked again
    assert time.monotonic() - started < 1.0 and receiver.drops
    assert _states(receives.poll()) == [("recv", STARTED), ("recv", ACTIVE)]  # not failed: still held
    receiver.recorded = True
    receives.poll()  # asks the receiver again, which now drops it
    num_drops = len(receiver.drops)
    assert receives.poll() == [] and len(receiver.drops) == num_drops  # dropped: not asked again
    receives.release("r")  # the receiver let go (its last copy ended, or the writer stopped)
    receives.on_transfer_failed("r", "cancelled on the decode instance")
    results = receives.poll()
    assert _states(results) == [("recv", FAILED)] and results[0].reason == "the client went away"


# ---- both workers over real gRPC ----
NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 4, 16, 16, 2, 32


def _kv_cache(block_size: int = BLOCK_SIZE, fill: bool = True) -> torch.Tensor:
    shape = (NUM_LAYERS, 2, NUM_BLOCKS, block_size, NUM_KV_HEADS, HEAD_DIM)
    return torch.randn(shape) if fill else torch.zeros(shape)


def _workers(model_dir: str, prefill_block_size: int = BLOCK_SIZE, **deploy):
    config = Config.from_dict({"deploy": {"kv_transfer_rpc_timeout_s": 5.0, **deploy}})
    prefill_cache, decode_cache = _kv_cache(prefill_block_size), _kv_cache(fill=False)
    fingerprint = model_fingerprint(model_dir)
    prefill = TransferWorker(config, prefill_cache, KVLayout.from_kv_cache(prefill_cache, fingerprint),
                             send=True, receive=False)
    decode = TransferWorker(config, decode_cache, KVLayout.from_kv_cache(decode_cache, fingerprint),
                            send=False, receive=True)
    return prefill, decode, prefill_cache, decode_cache, decode.address


def _poll_until(worker, kind: str, state: str, request_id: str, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for result in worker.poll():
            if (result.request_id, result.kind, result.state) == (request_id, kind, state):
                return result
        time.sleep(0.01)
    raise AssertionError(f"{request_id} never reported {kind} {state}")


def _send_step(prefill: TransferWorker, send: SendKV, first_token: int = 7) -> None:
    """What the runner does in the step that finishes the prompt: start, layer groups, sample."""
    prefill.start([send])
    for start, end in [(0, 2), (2, 4)]:
        prefill.layers_done([send.request_id], start, end)
    prefill.tokens_sampled({send.request_id: first_token})


def test_workers_move_the_prompt_kv_layer_group_by_group(tiny_model_dir):
    prefill, decode, prefill_cache, decode_cache, address = _workers(tiny_model_dir)
    try:
        src, dst = [5, 2, 11], [9, 0, 4, 13]  # the decode side reserved prompt + 1 tokens
        decode.start([RecvKV("r", dst[:3], 40)])
        _send_step(prefill, SendKV("r", src, 40, address), first_token=77)
        done = _poll_until(decode, "recv", FINISHED, "r")
        assert done.first_token_id == 77  # the commit carried the prefill's first token
        _poll_until(prefill, "send", FINISHED, "r")
        torch.testing.assert_close(decode_cache[:, :, dst[:3]], prefill_cache[:, :, src], rtol=0, atol=0)
        assert not decode_cache[:, :, dst[3]].any()  # the first token's block is the decode side's
        assert prefill.counters()["num_transfers_sent"] == 1
        num_bytes = 3 * NUM_LAYERS * 2 * BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * 4  # 3 blocks, float32
        assert decode.counters()["num_bytes_received"] == num_bytes
    finally:
        prefill.close()
        decode.close()


def test_a_send_that_comes_before_the_receive_is_registered_waits_for_it(tiny_model_dir):
    """The router starts the prefill while the decode instance reserves: the prefill's whole step (every
    layer and the first token) may be done before the decode side registers its blocks."""
    prefill, decode, prefill_cache, decode_cache, address = _workers(tiny_model_dir)
    try:
        src, dst = [5, 2, 11], [9, 0, 4, 13]
        _send_step(prefill, SendKV("r", src, 40, address), first_token=77)
        time.sleep(0.3)  # the sender is asking again meanwhile
        assert not decode_cache.any() and not any(r.state == FAILED for r in prefill.poll())
        decode.start([RecvKV("r", dst[:3], 40)])
        assert _poll_until(decode, "recv", FINISHED, "r").first_token_id == 77
        _poll_until(prefill, "send", FINISHED, "r")
        torch.testing.assert_close(decode_cache[:, :, dst[:3]], prefill_cache[:, :, src], rtol=0, atol=0)
        assert decode.counters()["num_refused"] == 0 and prefill.counters()["num_failed"] == 0
    finally:
        prefill.close()
        decode.close()


@pytest.mark.parametrize("how", ["cancelled", "never registered"])
def test_a_send_waiting_for_registration_ends_when_cancelled_or_after_the_rpc_timeout(tiny_model_dir, how):
    prefill, decode, _, decode_cache, address = _workers(tiny_model_dir, kv_transfer_rpc_timeout_s=0.5)
    try:
        _send_step(prefill, SendKV("r", [1, 2], 20, address))
        if how == "cancelled":
            time.sleep(0.1)
            prefill.start([CancelKV("r", "the router gave up on the request")])
        failed = _poll_until(prefill, "send", FAILED, "r")
        expected = "was cancelled before" if how == "cancelled" else "did not register request 'r' within 0.5s"
        assert expected in failed.reason, failed.reason
        assert not prefill.sends.has("r")  # reported failed once its lease ended: the blocks are free
        assert not decode_cache.any()
    finally:
        prefill.close()
        decode.close()


def test_a_cancelled_receive_never_writes_blocks_given_back(tiny_model_dir):
    prefill, decode, _, decode_cache, address = _workers(tiny_model_dir, kv_transfer_max_retries=1)
    try:
        decode.start([RecvKV("r", [3, 4], 20)])
        prefill.start([SendKV("r", [1, 2], 20, address)])
        deadline = time.monotonic() + 20
        while not decode.receives._expected.get("r", None) or not decode.receives._expected["r"].lent:
            assert time.monotonic() < deadline, "the Reserve never arrived"
            time.sleep(0.01)
        decode.start([CancelKV("r", "aborted")])  # the receiver drops it: nothing is written after
        for start, end in [(0, 2), (2, 4)]:
            prefill.layers_done(["r"], start, end)  # late chunks: refused, the retry finds nothing to lend
        prefill.tokens_sampled({"r": 7})
        _poll_until(prefill, "send", FAILED, "r")
        assert not decode_cache.any()
    finally:
        prefill.close()
        decode.close()


def test_a_cancelled_send_fails_and_gives_its_blocks_back(tiny_model_dir):
    prefill, decode, _, decode_cache, address = _workers(tiny_model_dir)
    try:
        decode.start([RecvKV("r", [3, 4], 20)])
        prefill.start([SendKV("r", [1, 2], 20, address)])
        prefill.layers_done(["r"], 0, 2)  # the rest never comes: a lease that runs out
        prefill.start([CancelKV("r", "KV lease expired after 1s")])
        failed = _poll_until(prefill, "send", FAILED, "r")
        assert "lease expired" in failed.reason
        _poll_until(decode, "recv", FAILED, "r")  # the peer was told to drop it
    finally:
        prefill.close()
        decode.close()


def test_a_sender_with_another_layout_is_refused(tiny_model_dir, caplog):
    prefill, decode, _, decode_cache, address = _workers(tiny_model_dir, prefill_block_size=8)
    try:
        decode.start([RecvKV("r", [3, 4], 20)])
        with caplog.at_level("ERROR"):
            _send_step(prefill, SendKV("r", [1, 2, 5], 20, address))
            _poll_until(prefill, "send", FAILED, "r")
        assert "block_size: prefill=8 decode=16" in caplog.text
        assert not decode_cache.any()
    finally:
        prefill.close()
        decode.close()


def test_a_dead_peer_is_forgotten_and_new_sends_to_it_fail_fast(tiny_model_dir):
    from tests.servers import free_port
    prefill, decode, _, _, address = _workers(tiny_model_dir, kv_transfer_rpc_timeout_s=1.0)
    decode.close()
    try:
        dead = f"127.0.0.1:{free_port()}"
        started = time.monotonic()
        prefill.start([SendKV(f"r{i}", [1, 2], 20, dead) for i in range(8)])
        failed, deadline = set(), time.monotonic() + 20
        while len(failed) < 8 and time.monotonic() < deadline:
            failed |= {r.request_id for r in prefill.poll() if r.state == FAILED}
            time.sleep(0.01)
        assert failed == {f"r{i}" for i in range(8)}
        # one handshake times out; the other seven fail at once instead of each waiting for theirs
        assert time.monotonic() - started < 5.0
    finally:
        prefill.close()


def test_instance_info_carries_a_layout_the_router_can_read(tiny_model_dir):
    from serving.engine.core_messages import EngineInfo
    from serving.engine.engine import build_engine
    from serving.instance.servicer import instance_info
    config = Config.from_dict({"model": tiny_model_dir, "kv_cache_memory_bytes": "8MiB"})
    engine = build_engine(config, "decode")
    try:
        info = pb.InstanceInfo.FromString(instance_info(InstanceSpec("decode-0", "decode", config),
                                                        EngineInfo.of(engine, pid=0))
                                          .SerializeToString())
        layout = KVLayout.from_proto(kv_pb.KVLayout.FromString(info.kv_layout))
        assert (layout.block_size, layout.num_layers, layout.dtype) == (BLOCK_SIZE, NUM_LAYERS, "float32")
        assert info.kv_address == engine.connector.address and info.kv_address
    finally:
        engine.close()


def test_a_corrupted_chunk_is_refused_by_its_checksum_and_never_written(tiny_model_dir, monkeypatch):
    from kvcache.transfer import receiver as receiver_module
    real_parse = receiver_module.wire.parse_chunk

    def corrupting_parse(message):
        header, payload = real_parse(message)
        damaged = bytearray(payload)
        damaged[len(damaged) // 2] ^= 0xFF  # one flipped byte on the way
        return header, memoryview(bytes(damaged))

    monkeypatch.setattr(receiver_module.wire, "parse_chunk", corrupting_parse)
    prefill, decode, _, decode_cache, address = _workers(tiny_model_dir, kv_transfer_checksum=True,
                                                         kv_transfer_enable_shm=False)
    try:
        decode.start([RecvKV("r", [3, 4], 20)])
        _send_step(prefill, SendKV("r", [1, 2], 20, address))
        _poll_until(prefill, "send", FAILED, "r")  # refused, retried once, refused again
        assert decode.counters()["num_checksum_mismatches"] >= 2
        assert not decode_cache.any()  # nothing written from a mismatching chunk
    finally:
        prefill.close()
        decode.close()


@pytest.mark.parametrize("enable_shm", [True, False])
def test_checksummed_transfers_are_bit_exact(tiny_model_dir, enable_shm):
    prefill, decode, prefill_cache, decode_cache, address = _workers(
        tiny_model_dir, kv_transfer_checksum=True, kv_transfer_enable_shm=enable_shm)
    try:
        src, dst = [5, 2, 11], [9, 0, 4]
        decode.start([RecvKV("r", dst, 40)])
        _send_step(prefill, SendKV("r", src, 40, address))
        _poll_until(decode, "recv", FINISHED, "r")
        torch.testing.assert_close(decode_cache[:, :, dst], prefill_cache[:, :, src], rtol=0, atol=0)
        assert decode.counters()["num_checksum_mismatches"] == 0
    finally:
        prefill.close()
        decode.close()
