"""Fused RMSNorm and rotary embedding (torch CPU path and Triton) against pdkernels.reference, and the
cos/sin cache against transformers' own rotary embedding."""

import pytest
import torch

from pdkernels import ops, reference
from pdkernels.rotary import compute_cos_sin_cache
from tests.pdkernels.helpers import TRITON_DEVICE, assert_close, compiled_path, torch_path

DTYPES = [torch.float32, torch.bfloat16]


def _rms_norm_impls():
    from pdkernels import triton_norm
    return [pytest.param(torch_path(ops.rms_norm), "cpu", id="torch"),
            pytest.param(compiled_path(ops.rms_norm), "cpu", id="compiled"),
            pytest.param(triton_norm.rms_norm, TRITON_DEVICE, id="triton")]


def _rotary_impls():
    from pdkernels import triton_norm
    return [pytest.param(torch_path(ops.rotary_embedding), "cpu", id="torch"),
            pytest.param(compiled_path(ops.rotary_embedding), "cpu", id="compiled"),
            pytest.param(triton_norm.rotary_embedding, TRITON_DEVICE, id="triton")]


@pytest.mark.parametrize("impl, device", _rms_norm_impls())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, hidden_size", [(1, 16), (7, 33), (5, 1000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(impl, device, dtype, num_tokens, hidden_size, with_residual):
    gen = torch.Generator().manual_seed(hidden_size)
    x = (3 * torch.randn(num_tokens, hidden_size, generator=gen)).to(dtype)
    weight = torch.randn(hidden_size, generator=gen).to(dtype)
    residual = torch.randn(num_tokens, hidden_size, generator=gen).to(dtype) if with_residual else None
    x_before = x.clone()
    expected = reference.rms_norm(x, weight, 1e-5, residual)
    actual = impl(x.to(device), weight.to(device), 1e-5, residual.to(device) if with_residual else None)
    if with_residual:
        assert_close(actual[0], expected[0], dtype)
        assert_close(actual[1], expected[1], dtype)
    else:
        assert_close(actual, expected, dtype)
    assert torch.equal(x, x_before), "rms_norm must not modify its input"


@pytest.mark.parametrize("impl, device", _rotary_impls())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head_dim, rot_dim", [(16, 16), (24, 8), (64, 64)])
def test_rotary_embedding_matches_reference(impl, device, dtype, is_neox, head_dim, rot_dim):
    """rot_dim < head_dim is partial rotary: the dims past rot_dim must come back untouched."""
    gen = torch.Generator().manual_seed(head_dim + rot_dim)
    num_tokens, max_position = 9, 300
    positions = torch.randint(0, max_position, (num_tokens,), generator=gen)
    q = torch.randn(num_tokens, 6, head_dim, generator=gen).to(dtype)
    k = torch.randn(num_tokens, 2, head_dim, generator=gen).to(dtype)
    cache = compute_cos_sin_cache(rot_dim, max_position, 10000.0)
    expected_q, expected_k = reference.rotary_embedding(positions, q, k, cache, is_neox)
    actual_q, actual_k = impl(positions.to(device), q.to(device), k.to(device), cache.to(device), is_neox)
    assert_close(actual_q, expected_q, dtype)
    assert_close(actual_k, expected_k, dtype)


ROPE_SCALINGS = [
    None,
    {"rope_type": "default"},
    {"type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 256},
]


@pytest.mark.parametrize("rope_scaling", ROPE_SCALINGS)
def test_rotary_matches_transformers_llama(rope_scaling):
    """The q/k a Llama attention layer would see after RoPE, from transformers and from our ops."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    head_dim, max_position, base = 64, 2048, 500000.0
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_position, rope_theta=base,
                         rope_scaling=dict(rope_scaling) if rope_scaling else None)
    gen = torch.Generator().manual_seed(0)
    positions = torch.randint(0, max_position, (11,), generator=gen)
    q = torch.randn(11, 4, head_dim, generator=gen)
    k = torch.randn(11, 2, head_dim, generator=gen)
    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    cache = compute_cos_sin_cache(head_dim, max_position, base, rope_scaling)
    our_q, our_k = ops.rotary_embedding(positions, q, k, cache)
    torch.testing.assert_close(our_q, hf_q[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(our_k, hf_k[0].transpose(0, 1), rtol=1e-6, atol=1e-6)


def test_llama3_scaling_changes_only_low_frequencies():
    """Guards against a scaling that silently does nothing: high frequencies kept, low ones divided."""
    scaling = ROPE_SCALINGS[3]
    plain = compute_cos_sin_cache(64, 2, 500000.0)[1, :32].acos()     # angle at position 1 = inv_freq
    scaled = compute_cos_sin_cache(64, 2, 500000.0, scaling)[1, :32].acos()
    torch.testing.assert_close(scaled[0], plain[0])
    torch.testing.assert_close(scaled[-1], plain[-1] / scaling["factor"])


@pytest.mark.parametrize("bad", [{"rope_type": "yarn", "factor": 2.0}, {"rope_type": "llama3", "factor": 8.0}])
def test_unsupported_or_incomplete_rope_scaling_is_rejected(bad):
    with pytest.raises(ValueError, match="rope_scaling"):
        compute_cos_sin_cache(64, 16, 10000.0, bad)
