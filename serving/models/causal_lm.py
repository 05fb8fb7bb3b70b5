"""One plain-PyTorch decoder for the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3).

The architectures differ only in small module choices made once in `__init__` from ModelArchConfig:
biased or bias-free projections, a per-head q/k RMSNorm or the identity, a tied or separate LM head.
q/k/v and gate/up are single fused projections; `serving.models.loader` concatenates the HF weights
into them at load time.

The model sees a step as one flat batch of T tokens (all requests' tokens concatenated) plus their
positions. Attention over each request's context is delegated to an `AttentionBackend`, so the model
knows nothing of paging, batching or the KV cache.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from pdkernels.ops import rms_norm, rotary_embedding, silu_and_mul
from pdkernels.rotary import compute_cos_sin_cache
from serving.models.config import ModelArchConfig


class AttentionBackend(Protocol):
    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (already rotated) for this step's T tokens -> out [T, Hq, D].

        The runner's backend stores k/v in its KV cache and attends over each request's context.
        """


class LayerRunner(Protocol):
    def __call__(self, start_layer: int, end_layer: int, positions: Tensor, hidden_states: Tensor,
                 residual: Tensor | None, attn: AttentionBackend) -> tuple[Tensor, Tensor]:
        """Decoder layers [start_layer, end_layer) over hidden_states [T, H] -> (hidden, residual) [T, H]."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor, residual: Tensor | None = None):
        # x [T, H]; with residual returns (norm(x + residual), x + residual), vLLM's fused add+norm.
        return rms_norm(x, self.weight, self.eps, residual)


class HeadRMSNorm(RMSNorm):
    """RMSNorm over the last dim of [T, num_heads, D] (Qwen3's q_norm / k_norm)."""

    def forward(self, x: Tensor) -> Tensor:
        num_tokens, num_heads, head_dim = x.shape
        return rms_norm(x.reshape(num_tokens * num_heads, head_dim), self.weight, self.eps
                        ).view(num_tokens, num_heads, head_dim)


class Attention(nn.Module):
    def __init__(self, config: ModelArchConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads, config.num_kv_heads, config.head_dim)
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = HeadRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = HeadRMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def forward(self, positions: Tensor, x: Tensor, cos_sin_cache: Tensor, attn: AttentionBackend
                ) -> Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)                                          # [T, (Hq + 2 Hkv) D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.view(num_tokens, self.num_heads, self.head_dim))      # [T, Hq, D]
        k = self.k_norm(k.view(num_tokens, self.num_kv_heads, self.head_dim))   # [T, Hkv, D]
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)             # [T, Hkv, D]
        q, k = rotary_embedding(positions, q, k, cos_sin_cache, is_neox=True)
        out = attn(self.layer_idx, q, k, v)                             # [T, Hq, D]
        return self.o_proj(out.reshape(num_tokens, self.q_size))        # [T, H]


class MLP(nn.Module):
    def __init__(self, config: ModelArchConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))             # [T, 2I] -> [T, I] -> [T, H]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelArchConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: Tensor, hidden_states: Tensor, residual: Tensor | None,
                cos_sin_cache: Tensor, attn: AttentionBackend) -> tuple[Tensor, Tensor]:
        # vLLM's residual stream: a layer returns (its output, the running sum before it) and the next
        # norm adds them, so the residual add is fused into the norm.
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, cos_sin_cache, attn)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class CausalLM(nn.Module):
    def __init__(self, config: ModelArchConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("cos_sin_cache", self._make_cos_sin_cache(), persistent=False)

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the checkpoint ties them (call after to_empty)."""
        if self.config.tie_word_embeddings and hasattr(self.embed_tokens, "weight") \
                and hasattr(self.lm_head, "weight"):  # not across pipeline stages: the last keeps a copy
            self.lm_head.weight = self.embed_tokens.weight

    def reset_cos_sin_cache(self) -> None:
        """Recompute the RoPE table in place (to_empty leaves the buffer uninitialised)."""
        self.cos_sin_cache = self._make_cos_sin_cache().to(self.cos_sin_cache.device)

    def _make_cos_sin_cache(self) -> Tensor:
        # float32 whatever the model dtype: the rotary kernel computes in float32, like transformers.
        config = self.config
        return compute_cos_sin_cache(config.head_dim, config.max_position_embeddings,
                                     config.rope_theta, config.rope_scaling)   # [max_pos, D]

    def forward(self, input_ids: Tensor | None, positions: Tensor, attn: AttentionBackend,
                start_layer: int = 0, end_layer: int | None = None,
                hidden_states: Tensor | None = None, residual: Tensor | None = None,
                layers: LayerRunner | None = None) -> tuple[Tensor, Tensor | None]:
        """Run decoder layers [start_layer, end_layer) over T tokens; mutates nothing but the KV cache
        that `attn` writes.

        input_ids/positions [T] int64. start_layer == 0 embeds input_ids; a later start resumes from
        the (hidden_states, residual) [T, H] that the previous range returned. Ending at the last
        layer applies the final norm and returns (normed hidden [T, H], None). `layers` runs the
        range instead of this module's own layers (the native decode step,
        serving/models/native_decoder.py); residual is None into the model's first layer.
        """
        num_layers = self.config.num_layers
        end_layer = num_layers if end_layer is None else end_layer
        if not 0 <= start_layer < end_layer <= num_layers:
            raise ValueError(f"layer range [{start_layer}, {end_layer}) must be a non-empty range "
                             f"within the model's {num_layers} layers")
        if start_layer == 0:
            if input_ids is None:
                raise ValueError("input_ids are required when start_layer == 0")
            hidden_states, residual = self.embed_tokens(input_ids), None    # [T, H]
        elif hidden_states is None or residual is None:
            raise ValueError(f"start_layer={start_layer} resumes a partial pass: pass the hidden_states "
                             "and residual that the call ending at that layer returned")
        hidden_states, residual = (layers or self.run_layers)(start_layer, end_layer, positions, hidden_states,
                                                              residual, attn)
        if end_layer < num_layers:
            return hidden_states, residual
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states, None

    def run_layers(self, start_layer: int, end_layer: int, positions: Tensor, hidden_states: Tensor,
                   residual: Tensor | None, attn: AttentionBackend) -> tuple[Tensor, Tensor]:
        for layer in self.layers[start_layer:end_layer]:
            hidden_states, residual = layer(positions, hidden_states, residual, self.cos_sin_cache, attn)
        return hidden_states, residual

    def compute_logits(self, hidden_states: Tensor) -> Tensor:
        return self.lm_head(hidden_states).float()                          # [N, H] -> [N, V]
