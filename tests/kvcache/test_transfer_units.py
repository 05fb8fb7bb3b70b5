"""In-process pieces of the KV transfer layer: layout checks, chunk plans, wire framing, leases."""
import pytest
import torch

from kvcache.transfer._proto import kv_transfer_pb2 as pb
from kvcache.transfer import wire
from kvcache.transfer.chunking import plan_chunks
from kvcache.transfer.config import TransferConfig
from kvcache.transfer.layout import IncompatibleLayoutError, KVLayout
from kvcache.transfer.lease import LeaseTable
from kvcache.transfer.pins import Pins


def make_layout(**overrides) -> KVLayout:
    fields = dict(model_fingerprint="m1", dtype="float32", block_size=16, num_layers=4, num_kv_heads=2,
                  head_dim=8)
    return KVLayout(**(fields | overrides))


def test_check_compatible_names_every_differing_field_with_both_values():
    ours = make_layout()
    theirs = make_layout(model_fingerprint="m2", block_size=32, num_kv_heads=4, tp_size=2)
    ours.check_compatible(make_layout())  # identical: no error
    with pytest.raises(IncompatibleLayoutError) as info:
        ours.check_compatible(theirs, ours="prefill", theirs="decode")
    message = str(info.value)
    for expected in ("model_fingerprint: prefill='m1' decode='m2'", "block_size: prefill=16 decode=32",
                     "total_kv_heads: prefill=2 decode=8"):
        assert expected in message
    assert len(info.value.differences) == 3
    # the tensor-parallel plan may differ (the sender converts it): not named
    assert "head_dim:" not in message and "dtype:" not in message and "tp_size:" not in message


def test_layout_round_trips_through_proto_and_matches_its_cache():
    layout = make_layout(dtype="bfloat16", tp_size=2, tp_rank=1)
    assert KVLayout.from_proto(layout.to_proto()) == layout
    kv_cache = torch.zeros(4, 2, 10, 16, 2, 8, dtype=torch.bfloat16)
    layout.check_cache(kv_cache)
    assert layout.num_bytes_per_layer_block == 2 * 16 * 2 * 8 * 2
    with pytest.raises(ValueError, match=r"shape \(4, 2, 10, 8, 2, 8\), the layout wants \(4, 2, 10, 16, 2, 8\)"):
        layout.check_cache(torch.zeros(4, 2, 10, 8, 2, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="tp_rank"):
        make_layout(tp_size=2, tp_rank=2)


def test_pipeline_stages_travel_with_the_layout_and_may_differ_between_peers():
    staged = make_layout(pp_size=2, pp_partition=(3, 1))
    assert KVLayout.from_proto(staged.to_proto()) == staged
    assert [staged.rank_layers(r) for r in range(2)] == [(0, 3), (3, 4)]
    assert staged.rank_cache_layout(1).num_layers == 1
    assert make_layout(pp_size=2).pp_partition == (2, 2)  # none given: the even split
    assert make_layout(pp_size=3).pp_partition == (1, 2, 1)  # vLLM's: the remainder before the last stage
    staged.check_compatible(make_layout(pp_size=2, pp_partition=(1, 3)))  # the sender converts
    staged.check_compatible(make_layout())
    with pytest.raises(ValueError, match="add up to the model's 4 layers"):
        make_layout(pp_size=2, pp_partition=(3, 2))


@pytest.mark.parametrize("layer_start,layer_end,num_blocks,max_chunk_blocks", [
    (0, 4, 3, 100),   # everything in one chunk
    (1, 4, 3, 7),     # two layers per chunk, a remainder layer
    (0, 3, 17, 5),    # layers split into block ranges with a short tail
    (2, 3, 1, 1),     # one block, one layer
])
def test_chunk_plan_covers_each_layer_block_exactly_once_within_the_limit(layer_start, layer_end, num_blocks,
                                                                           max_chunk_blocks):
    num_bytes_per_layer_block = 96
    chunks = plan_chunks(layer_start, layer_end, num_blocks, num_bytes_per_layer_block,
                         max_chunk_blocks * num_bytes_per_layer_block)
    coverage = torch.zeros(layer_end + 1, num_blocks, dtype=torch.int64)
    for chunk in chunks:
        assert chunk.num_layers * chunk.num_blocks <= max_chunk_blocks
        coverage[chunk.layer_start:chunk.layer_end, chunk.block_start:chunk.block_end] += 1
    expected = torch.zeros_like(coverage)
    expected[layer_start:layer_end] = 1
    assert torch.equal(coverage, expected)


def test_chunk_plan_refuses_a_block_above_the_limit():
    with pytest.raises(ValueError, match="raise max_chunk_bytes"):
        plan_chunks(0, 1, 1, 4097, 4096)


@pytest.mark.parametrize("num_bytes", [0, 4, 1000, 3 * 1024**2 + 12])
def test_chunk_message_is_a_valid_kvchunk_and_parses_in_place(num_bytes):
    header = pb.ChunkHeader(request_id="req-7", attempt=1, layer_start=2, layer_end=3, block_start=0,
                            block_end=5, num_bytes=num_bytes)
    message, payload = wire.new_chunk_message(header)
    content = torch.randint(0, 256, (num_bytes,), dtype=torch.uint8)
    payload.copy_(content)
    decoded = pb.KVChunk.FromString(message)  # what any protobuf implementation reads
    assert decoded.header == header and decoded.payload == content.numpy().tobytes()
    parsed_header, parsed_payload = wire.parse_chunk(message)
    assert parsed_header == header
    assert bytes(parsed_payload) == content.numpy().tobytes()
    if num_bytes:
        viewed = wire.view_payload(parsed_payload, torch.uint8)
        assert viewed.data_ptr() == payload.data_ptr()  # the same bytes, not a copy
        assert viewed.data_ptr() % 16 == 0


def test_parse_chunk_accepts_protobuf_encoded_messages_in_any_field_order():
    header = pb.ChunkHeader(request_id="r", layer_end=1, block_end=1, num_bytes=8)
    payload = bytes(range(8))
    reordered = pb.KVChunk(payload=payload).SerializeToString() + pb.KVChunk(header=header).SerializeToString()
    parsed_header, parsed_payload = wire.parse_chunk(reordered)
    assert parsed_header == header and bytes(parsed_payload) == payload
    assert torch.equal(wire.view_payload(parsed_payload, torch.float32),
                       torch.frombuffer(bytearray(payload), dtype=torch.float32))


def test_lease_release_waits_for_the_last_pin_and_runs_once():
    released = []
    now = [0.0]
    leases = LeaseTable(released.append, ttl_s=10.0, clock=lambda: now[0])
    leases.grant("a", [1, 2])
    leases.grant("b", [3])
    with pytest.raises(ValueError, match="already holds"):
        leases.grant("a", [4])
    lease = leases.pin("a")
    assert lease is not None and lease.block_ids == [1, 2]
    assert leases.release("a") and released == []  # a copy still reads the blocks
    assert leases.pin("a") is None and not leases.release("a")
    lease.pins.unpin()
    assert released == ["a"]
    now[0] = 10.0
    assert leases.expire() == ["b"] and released == ["a", "b"]
    assert len(leases) == 0 and leases.expire() == []


def test_pins_refuse_new_pins_once_closing():
    calls = []
    pins = Pins(lambda: calls.append(1))
    assert pins.pin()
    assert pins.close() and not pins.close()
    assert not pins.pin()
    pins.unpin()
    assert calls == [1]
    with pytest.raises(RuntimeError):
        pins.unpin()


def test_config_errors_say_what_to_change():
    with pytest.raises(ValueError, match="--kv-transfer-failure-policy"):
        TransferConfig(failure_policy="ignore")
    with pytest.raises(ValueError, match="--kv-transfer-max-chunk-bytes"):
        TransferConfig(max_chunk_bytes=10)
    with pytest.raises(ValueError, match="--kv-transfer-stall-timeout-s"):
        TransferConfig(stall_timeout_s=0)
