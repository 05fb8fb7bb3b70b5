"""KV write from a slot mapping and KV pack / unpack (torch CPU path and Triton) against
pdkernels.reference. These ops only move data, so results must be bit-exact."""

import pytest
import torch

from pdkernels import ops, reference
from tests.pdkernels.helpers import TRITON_DEVICE, compiled_path, torch_path

DTYPES = [torch.float32, torch.bfloat16]


def _impls(name: str):
    from pdkernels import triton_cache
    torch_fn = getattr(ops, name)
    if name == "pack_kv":
        def triton_fn(kv_cache, block_ids, layer_start=0, layer_end=None, out=None):
            layer_end = kv_cache.shape[0] if layer_end is None else layer_end
            return triton_cache.pack_kv(kv_cache, block_ids, layer_start, layer_end, out)
    else:
        triton_fn = getattr(triton_cache, name)
    cpu = [pytest.param(torch_path(torch_fn), "cpu", id="torch")]
    if name == "write_kv":
        cpu.append(pytest.param(compiled_path(torch_fn), "cpu", id="compiled"))
    return [*cpu, pytest.param(triton_fn, TRITON_DEVICE, id="triton")]


def _random_cache(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, gen):
    shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
    return torch.randn(shape, generator=gen).to(dtype)


@pytest.mark.parametrize("impl, device", _impls("write_kv"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size, num_kv_heads, head_dim", [(4, 2, 16), (5, 3, 24), (16, 8, 128)])
def test_write_kv_matches_reference(impl, device, dtype, block_size, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(block_size)
    kv_cache = _random_cache(1, 9, block_size, num_kv_heads, head_dim, dtype, gen)
    num_slots = 9 * block_size
    num_tokens = 11
    slot_mapping = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slot_mapping[[2, 7]] = -1                                  # padding tokens: skipped
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    expected = kv_cache.clone()
    reference.write_kv(key, value, expected[0, 0], expected[0, 1], slot_mapping)
    actual = kv_cache.clone().to(device)
    impl(key.to(device), value.to(device), actual[0, 0], actual[0, 1], slot_mapping.to(device))
    assert torch.equal(actual.cpu(), expected)
    assert not torch.equal(expected, kv_cache), "the scenario must change the cache"


@pytest.mark.parametrize("impl, device", _impls("pack_kv"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer_start, layer_end", [(0, None), (1, 3), (2, 3)])
@pytest.mark.parametrize("block_ids", [[6, 1, 9], [3, 4, 5, 6, 10, 11], [0]], ids=["scattered", "groups", "one"])
def test_pack_kv_matches_reference(impl, device, dtype, layer_start, layer_end, block_ids):
    gen = torch.Generator().manual_seed(len(block_ids))
    kv_cache = _random_cache(3, 12, 5, 2, 24, dtype, gen)
    ids = torch.tensor(block_ids, dtype=torch.int64)
    expected = reference.pack_kv(kv_cache, ids, layer_start, layer_end)
    actual = impl(kv_cache.to(device), ids.to(device), layer_start, layer_end)
    assert actual.is_contiguous()
    assert torch.equal(actual.cpu(), expected)


@pytest.mark.parametrize("impl, device", _impls("pack_kv"))
def test_pack_kv_fills_given_buffer(impl, device):
    gen = torch.Generator().manual_seed(0)
    kv_cache = _random_cache(2, 8, 4, 2, 16, torch.float32, gen).to(device)
    ids = torch.tensor([7, 2], device=device)
    out = torch.empty((2, 2, 2, 4, 2, 16), device=device)
    result = impl(kv_cache, ids, 0, None, out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out.cpu(), reference.pack_kv(kv_cache.cpu(), ids.cpu()))


@pytest.mark.parametrize("impl, device", _impls("unpack_kv"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer_start, num_layers", [(0, 3), (1, 2)])
def test_unpack_kv_matches_reference(impl, device, dtype, layer_start, num_layers):
    gen = torch.Generator().manual_seed(layer_start)
    kv_cache = _random_cache(3, 12, 5, 2, 24, dtype, gen)
    ids = torch.tensor([11, 0, 4, 5])
    buffer = torch.randn(num_layers, 2, 4, 5, 2, 24, generator=gen).to(dtype)
    expected = kv_cache.clone()
    reference.unpack_kv(buffer, expected, ids, layer_start)
    actual = kv_cache.clone().to(device)
    impl(buffer.to(device), actual, ids.to(device), layer_start)
    assert torch.equal(actual.cpu(), expected)


def test_pack_then_unpack_moves_blocks_between_caches():
    """The swap / transfer round trip: blocks of one cache land at other ids of another cache."""
    gen = torch.Generator().manual_seed(3)
    src = _random_cache(4, 10, 4, 2, 16, torch.float32, gen)
    dst = torch.zeros_like(src)
    src_ids, dst_ids = torch.tensor([2, 3, 8]), torch.tensor([0, 9, 5])
    ops.unpack_kv(ops.pack_kv(src, src_ids), dst, dst_ids)
    assert torch.equal(dst[:, :, dst_ids], src[:, :, src_ids])
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[dst_ids] = False
    assert torch.count_nonzero(dst[:, :, untouched]) == 0


@pytest.mark.gpu
def test_a_gpu_cache_packs_into_and_unpacks_from_host_buffers():
    """KV transfer's payloads and slabs are host memory, its caches GPU memory; block ids come as host
    tensors: the ops take them as they are."""
    gen = torch.Generator().manual_seed(4)
    src = _random_cache(4, 10, 4, 2, 16, torch.float32, gen).cuda()
    dst = torch.zeros_like(src)
    src_ids, dst_ids = torch.tensor([2, 3, 8]), torch.tensor([0, 9, 5])
    host = torch.empty(4, 2, 3, 4, 2, 16)
    assert ops.pack_kv(src, src_ids, out=host) is host and torch.equal(host, src[:, :, src_ids.cuda()].cpu())
    ops.unpack_kv(host, dst, dst_ids)
    assert torch.equal(dst[:, :, dst_ids.cuda()], src[:, :, src_ids.cuda()])


def test_pack_kv_rejects_layer_range_outside_cache():
    kv_cache = torch.zeros(2, 2, 4, 4, 1, 16)
    with pytest.raises(ValueError, match="layer range"):
        ops.pack_kv(kv_cache, torch.tensor([0]), 1, 3)
