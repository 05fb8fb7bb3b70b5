"""The architecture of a model, parsed from a Hugging Face model directory.

`ModelArchConfig` is everything the model code and the model runner need to know about a checkpoint:
sizes, RoPE, which small variations of the shared decoder layer it uses, and its stop tokens. It is
read from config.json (+ generation_config.json for eos ids); transformers is not needed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class _ArchTraits:
    """How one architecture's config.json maps onto the shared decoder layer."""
    qkv_bias: bool | None  # a fixed value, or None: read config.json's "attention_bias"
    o_proj_bias: bool | None  # same; None follows "attention_bias" as transformers does
    qk_norm: bool  # RMSNorm over each head of q and k before RoPE (Qwen3)


# The four HF architectures differ only in these traits (checked against transformers' modeling files):
# Llama and Qwen3 put `attention_bias` on q/k/v/o alike, Qwen2 always biases q/k/v and never o,
# Mistral never biases.
_ARCH_TRAITS = {
    "LlamaForCausalLM": _ArchTraits(qkv_bias=None, o_proj_bias=None, qk_norm=False),
    "MistralForCausalLM": _ArchTraits(qkv_bias=False, o_proj_bias=False, qk_norm=False),
    "Qwen2ForCausalLM": _ArchTraits(qkv_bias=True, o_proj_bias=False, qk_norm=False),
    "Qwen3ForCausalLM": _ArchTraits(qkv_bias=None, o_proj_bias=None, qk_norm=True),
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_ARCH_TRAITS)


def check_architecture(architecture: str) -> None:
    if architecture not in _ARCH_TRAITS:
        raise ValueError(
            f"unsupported model architecture {architecture!r}: pdserve supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (the 'architectures' entry of config.json)")


@dataclass(frozen=True)
class ModelArchConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None for plain RoPE, else the HF dict (rope_type, factor, ...)
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on the q/k/v projections
    qk_norm: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    # Defaulted extras beyond the runner's interface: o_proj's bias (Llama/Qwen3 attention_bias),
    # and the sliding attention window some Mistral/Qwen2 checkpoints declare. The model attends
    # over the whole context, so it is exact only up to `sliding_window` tokens; the runner should
    # cap max_model_len there.
    o_proj_bias: bool = False
    sliding_window: int | None = None

    def __post_init__(self):
        check_architecture(self.architecture)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}; fix config.json")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads}); fix config.json")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}; fix config.json")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("rms_norm_eps and rope_theta must be positive; fix config.json")
        if not self.eos_token_ids:
            raise ValueError("the model declares no eos token: set eos_token_id in config.json "
                             "or generation_config.json")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_model_dir(cls, model_dir: str) -> ModelArchConfig:
        hf = _read_json(os.path.join(model_dir, "config.json"), required=True)
        gen = _read_json(os.path.join(model_dir, "generation_config.json"), required=False)
        architectures = hf.get("architectures") or []
        if len(architectures) != 1:
            raise ValueError(f"config.json in {model_dir} must list exactly one architecture, got "
                             f"{architectures!r}; pdserve supports {', '.join(SUPPORTED_ARCHITECTURES)}")
        architecture = architectures[0]
        check_architecture(architecture)
        _check_unsupported_options(hf)
        traits = _ARCH_TRAITS[architecture]
        num_heads = hf["num_attention_heads"]
        rope_theta, rope_scaling = _parse_rope(hf)
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            architecture=architecture,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            # All four architectures default to untied in transformers when the key is absent.
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias if traits.qkv_bias is None else traits.qkv_bias,
            o_proj_bias=attention_bias if traits.o_proj_bias is None else traits.o_proj_bias,
            qk_norm=traits.qk_norm,
            eos_token_ids=_merge_ids(hf.get("eos_token_id"), gen.get("eos_token_id")),
            bos_token_id=gen.get("bos_token_id", hf.get("bos_token_id")),
            sliding_window=_sliding_window(hf),
        )


def _read_json(path: str, required: bool) -> dict:
    if not os.path.exists(path):
        if required:
            raise ValueError(f"{path} not found: --model must be a local Hugging Face model directory "
                             "(config.json, *.safetensors, tokenizer files)")
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_unsupported_options(hf: dict) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported; only 'silu' is")
    if hf.get("mlp_bias", False):
        raise ValueError("mlp_bias=true is not supported; only bias-free MLPs are")


def _parse_rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from either config layout.

    transformers < 5 writes top-level `rope_theta` + `rope_scaling`; transformers 5 writes one
    `rope_parameters` dict that holds rope_theta too.
    """
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    return rope_theta, (params if rope_type != "default" else None)


def _sliding_window(hf: dict) -> int | None:
    window = hf.get("sliding_window")
    if window is None or hf.get("use_sliding_window", True) is False:
        return None
    if "sliding_attention" not in hf.get("layer_types", ["sliding_attention"]):
        return None
    return int(window)


def _merge_ids(*values) -> tuple[int, ...]:
    """Union of eos ids from config.json and generation_config.json (each an int, a list, or None)."""
    ids: list[int] = []
    for value in values:
        for token_id in ([] if value is None else [value] if isinstance(value, int) else value):
            if token_id not in ids:
                ids.append(int(token_id))
    return tuple(ids)
