"""PackedLinear (serving/models/cpu_linear.py) against F.linear, with pdserve's small-M kernel and without
it (torch's paths only), and the transform against the plain model: same numbers, same greedy tokens."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scheduler import SamplingParams
from serving.models import load_model
from pdkernels import cpu_native
from serving.models.cpu_linear import PackedLinear, pack_linears, packing_supported, unpack_linears

pytestmark = pytest.mark.skipif(not packing_supported(torch.device("cpu"), torch.float32),
                                reason="this torch has no oneDNN")

# (in_features, out_features, bias): the small model's layers, odd sizes. With the kernel library 1-8
# rows take the small-M kernel and more oneDNN; without it (torch only) MKL's w @ x.T at 1-2 rows, one
# row padded to two up to in_features 1024, oneDNN from 3 rows.
SHAPES = [(768, 1280, False), (2048, 768, False), (768, 4096, True), (33, 17, True), (1100, 5, False)]
ROWS = [0, 1, 2, 3, 4, 7, 8, 9, 64, 300]


@pytest.fixture(params=["kernel", "torch only"])
def kernels(request, monkeypatch):
    """The small-M kernel library (built for this machine) or none (what a machine without a compiler gets)."""
    if request.param == "kernel":
        if cpu_native.library() is None:
            pytest.fail("the small-M kernel library did not build here (see the warning); g++ is part of the setup")
    else:
        monkeypatch.setattr(cpu_native, "library", lambda: None)
    return request.param


@pytest.mark.parametrize("in_features, out_features, bias", SHAPES)
def test_packed_linear_equals_f_linear(in_features, out_features, bias, kernels):
    gen = torch.Generator().manual_seed(in_features * 31 + out_features)
    linear = nn.Linear(in_features, out_features, bias=bias).requires_grad_(False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5)
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=gen))
    packed = PackedLinear(linear, keep_plain=False)
    assert (packed.tiled_weight is not None) == (kernels == "kernel")
    assert (packed.plain_weight is None) == (kernels == "kernel")  # kept only for the torch-only path
    assert torch.equal(packed.weight, linear.weight)  # rebuilt from the tiled copy: bit-identical
    for num_rows in ROWS:
        x = torch.randn(num_rows, in_features, generator=gen)
        out = packed(x)
        expected = F.linear(x.double(), linear.weight.double(), None if linear.bias is None else linear.bias.double())
        assert out.dtype == torch.float32 and out.shape == (num_rows, out_features) and out.is_contiguous()
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    x3 = torch.randn(2, 3, in_features, generator=gen)  # leading dims are kept
    torch.testing.assert_close(packed(x3), F.linear(x3, linear.weight, linear.bias), atol=1e-5, rtol=1e-5)


def test_pack_and_unpack_give_back_the_same_weights(tiny_model_dir, monkeypatch):
    from serving.models import loader
    with monkeypatch.context() as patch:
        patch.setattr(loader, "packing_supported", lambda device, dtype: False)
        plain = dict(load_model(tiny_model_dir, torch.float32, torch.device("cpu")).named_parameters())
    model = load_model(tiny_model_dir, torch.float32, torch.device("cpu"))
    linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert linears and not any(type(m) is nn.Linear for m in model.modules())  # load_model packs on CPU
    num_layers = model.config.num_layers
    assert unpack_linears(model) == len(linears) == 4 * num_layers + 1  # qkv, o, gate_up, down, lm_head
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    unpacked = dict(model.named_parameters())
    assert unpacked.keys() == plain.keys()
    assert all(torch.equal(unpacked[name], plain[name]) for name in plain)
    assert pack_linears(model) == len(linears)


def test_packing_drops_the_plain_weight_unless_it_is_shared(tiny_model_dir):
    model = load_model(tiny_model_dir, torch.float32, torch.device("cpu"))
    if cpu_native.library() is None:
        pytest.fail("the small-M kernel library did not build here")
    layer = model.layers[0].mlp.down_proj
    assert isinstance(layer, PackedLinear) and layer.plain_weight is None and layer.tiled_weight is not None


def test_tied_lm_head_stays_tied_when_packed():
    embedding = nn.Embedding(50, 24)
    head = nn.Linear(24, 50, bias=False)
    head.weight = embedding.weight
    model = nn.Sequential(embedding, head)
    pack_linears(model)
    assert isinstance(model[1], PackedLinear) and model[1].weight is embedding.weight


def test_no_packing_off_cpu_float32():
    model = nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16))
    assert pack_linears(model) == 0 and type(model[0]) is nn.Linear


def test_transform_leaves_greedy_output_unchanged(tiny_model_dir):
    from serving.llm import LLM
    llm = LLM(tiny_model_dir, block_size=4, num_blocks_override=256, max_num_batched_tokens=32, max_model_len=256)
    prompts = ["hello", "The quick brown fox jumps over the lazy dog", "1 2 3", "x" * 40]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    # batches of 4 (oneDNN), then 1-3 rows as requests finish at different lengths (MKL's w @ x.T)
    packed = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    unpack_linears(llm.engine.runner.model)
    plain = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    assert packed == plain
