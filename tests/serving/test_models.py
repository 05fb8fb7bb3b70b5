"""serving.models against transformers: same weights, same logits, for each supported architecture."""
import json

import pytest
import torch
import torch.nn.functional as F
import transformers

from serving.models import SUPPORTED_ARCHITECTURES, ModelArchConfig, load_model

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

# name -> (config class, architecture, extra config kwargs, save_pretrained kwargs)
CASES = {
    "llama3-rope-scaling": (transformers.LlamaConfig, "LlamaForCausalLM", dict(
        rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=16)),
        {}),
    "llama-tied-bias": (transformers.LlamaConfig, "LlamaForCausalLM",
                        dict(tie_word_embeddings=True, attention_bias=True), {}),
    "mistral": (transformers.MistralConfig, "MistralForCausalLM", dict(sliding_window=None), {}),
    # Sharded on purpose: exercises model.safetensors.index.json.
    "qwen2-qkv-bias": (transformers.Qwen2Config, "Qwen2ForCausalLM", {}, dict(max_shard_size="100KB")),
    "qwen3-qk-norm": (transformers.Qwen3Config, "Qwen3ForCausalLM", dict(head_dim=32), {}),
    # one KV head for four query heads, and a vocabulary no tensor-parallel size above 1 divides
    "llama-mqa-odd-vocab": (transformers.LlamaConfig, "LlamaForCausalLM",
                            dict(num_key_value_heads=1, vocab_size=131), {}),
}
PROMPT_LENGTHS = (1, 7, 33)


def _peaked_init_(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise so attention and RoPE matter (HF's std 0.02 makes attention nearly uniform,
    which would hide a wrong rotation or mask): std 1/sqrt(fan_in), O(1) embeddings, norms near 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.dim() == 2:
                std = 1.0 if "embed_tokens" in name else param.shape[1] ** -0.5
            elif "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
                continue
            else:
                std = 0.5  # biases
            param.copy_(std * torch.randn(param.shape, generator=gen))


def dense_causal_attention(seq_lens: list[int]):
    """An AttentionBackend over a flat batch of whole sequences: causal SDPA per sequence, GQA expanded."""
    def attend(layer_idx, q, k, v):
        outs, start = [], 0
        for seq_len in seq_lens:
            qs, ks, vs = (t[start:start + seq_len].transpose(0, 1) for t in (q, k, v))  # [H, L, D]
            group = qs.shape[0] // ks.shape[0]
            ks, vs = ks.repeat_interleave(group, dim=0), vs.repeat_interleave(group, dim=0)
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
            start += seq_len
        return torch.cat(outs)                                              # [T, Hq, D]
    return attend


def save_hf_case(case: str, model_dir) -> torch.nn.Module:
    """The transformers model of CASES[case] (seeded, peaked weights), saved into model_dir; returned."""
    config_cls, architecture, extra, save_kwargs = CASES[case]
    config = config_cls(**{**COMMON, **extra}, bos_token_id=1, eos_token_id=2)
    config.architectures = [architecture]
    torch.manual_seed(0)
    hf_model = getattr(transformers, architecture)(config).eval()
    _peaked_init_(hf_model, seed=1)
    hf_model.save_pretrained(model_dir, **save_kwargs)
    return hf_model


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_and_ours(request, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp(request.param)
    hf_model = save_hf_case(request.param, model_dir)
    ours = load_model(str(model_dir), torch.float32, torch.device("cpu"))
    return request.param, hf_model, ours, model_dir


def _prompt(seq_len: int, seed: int) -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (seq_len,), generator=torch.Generator().manual_seed(seed))


def _hf_logits(hf_model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids[None]).logits[0].float()                 # [L, V]


def _our_logits(model, prompts: list[torch.Tensor]) -> torch.Tensor:
    input_ids = torch.cat(prompts)
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    attn = dense_causal_attention([len(p) for p in prompts])
    with torch.no_grad():
        hidden, residual = model(input_ids, positions, attn)
        assert residual is None
        return model.compute_logits(hidden)                                # [T, V]


def test_config_matches_hf(hf_and_ours):
    name, hf_model, ours, model_dir = hf_and_ours
    config = ModelArchConfig.from_model_dir(str(model_dir))
    hf_config = hf_model.config
    assert config.architecture == CASES[name][1]
    assert config.num_layers == hf_config.num_hidden_layers
    assert config.head_dim == (32 if name == "qwen3-qk-norm" else 64 // 4) == hf_model.model.layers[0] \
        .self_attn.head_dim
    assert (model_dir / "model.safetensors.index.json").exists() == (name == "qwen2-qkv-bias")
    assert config.eos_token_ids == (2,) and config.bos_token_id == 1
    assert config.tie_word_embeddings == (name == "llama-tied-bias")
    assert config.attention_bias == (name in ("llama-tied-bias", "qwen2-qkv-bias"))
    assert config.qk_norm == (name == "qwen3-qk-norm")
    assert (config.rope_scaling or {}).get("rope_type") == ("llama3" if name.startswith("llama3") else None)


def test_logits_match_hf_per_prompt(hf_and_ours):
    _, hf_model, ours, _ = hf_and_ours
    for seed, seq_len in enumerate(PROMPT_LENGTHS):
        prompt = _prompt(seq_len, seed)
        expected = _hf_logits(hf_model, prompt)
        # Logits of order 1, not HF-init's ~0.1: the tolerance below is then a tight one.
        assert expected.std() > 0.5
        torch.testing.assert_close(_our_logits(ours, [prompt]), expected, atol=2e-4, rtol=1e-4)


def test_flat_batch_of_prompts_matches_hf(hf_and_ours):
    """Several requests flattened into one step, as the runner sends them."""
    _, hf_model, ours, _ = hf_and_ours
    prompts = [_prompt(seq_len, 10 + seed) for seed, seq_len in enumerate(PROMPT_LENGTHS)]
    expected = torch.cat([_hf_logits(hf_model, p) for p in prompts])
    torch.testing.assert_close(_our_logits(ours, prompts), expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("split_layer", [1, 2])
def test_layer_ranges_compose_to_full_pass(hf_and_ours, split_layer):
    _, _, ours, _ = hf_and_ours
    prompt = _prompt(19, seed=3)
    positions = torch.arange(len(prompt))
    attn = dense_causal_attention([len(prompt)])
    with torch.no_grad():
        full, _ = ours(prompt, positions, attn)
        hidden, residual = ours(prompt, positions, attn, start_layer=0, end_layer=split_layer)
        assert residual is not None and hidden.shape == residual.shape == full.shape
        resumed, last_residual = ours(None, positions, attn, start_layer=split_layer,
                                      hidden_states=hidden, residual=residual)
    assert last_residual is None
    torch.testing.assert_close(resumed, full, atol=0, rtol=0)


def test_bad_layer_ranges_are_rejected(hf_and_ours):
    _, _, ours, _ = hf_and_ours
    prompt = _prompt(4, seed=0)
    attn = dense_causal_attention([4])
    with pytest.raises(ValueError, match="hidden_states"):
        ours(None, torch.arange(4), attn, start_layer=1)
    with pytest.raises(ValueError, match="layer range"):
        ours(prompt, torch.arange(4), attn, start_layer=2, end_layer=2)


def test_tied_embeddings_share_one_tensor(hf_and_ours):
    name, _, ours, model_dir = hf_and_ours
    tied = ours.lm_head.weight.data_ptr() == ours.embed_tokens.weight.data_ptr()
    assert tied == (name == "llama-tied-bias")


def test_unsupported_architecture_names_supported_ones(tmp_path):
    config = transformers.LlamaConfig(**COMMON)
    config.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        raw = json.load(f)
    raw["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError) as excinfo:
        load_model(str(tmp_path), torch.float32, torch.device("cpu"))
    message = str(excinfo.value)
    assert "GPT2LMHeadModel" in message
    assert all(arch in message for arch in SUPPORTED_ARCHITECTURES)


def test_missing_weights_are_reported(tmp_path):
    config = transformers.LlamaConfig(**COMMON, eos_token_id=2)
    config.architectures = ["LlamaForCausalLM"]
    model = transformers.LlamaForCausalLM(config)
    state = {k: v for k, v in model.state_dict().items() if "layers.1.self_attn.k_proj" not in k}
    model.save_pretrained(tmp_path, state_dict=state)
    with pytest.raises(ValueError, match="missing"):
        load_model(str(tmp_path), torch.float32, torch.device("cpu"))
