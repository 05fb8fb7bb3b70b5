"""Decode steps of a packed float32 CausalLM on CPU, each range of layers in one native call.

The model's Python path (serving/models/causal_lm.py over pdkernels/ops.py) already runs pdserve's
compiled kernels; at 1-8 rows what is left is the ~200 module and wrapper calls a step makes
(~3 ms of a ~20 ms batch-1 step on the small model). `NativeDecoder` binds each layer's tensors once
(pdkernels/cpu_decode_layers.py) and runs the same kernels in the same order from one C call per
chain segment: a bit-identical result, without the calls. It is what a CUDA graph is to a GPU
decode step, and `--enforce-eager` turns it off, as it turns graphs off in vLLM.

It is a layer runner the model's forward takes in place of its own layers, so embedding, the final
norm and the argument checks stay the model's:

    model(input_ids, positions, attn, start_layer, end_layer, hidden, residual, layers=decoder)

for a step whose every row is one new token (attn.meta.max_query_len == 1) with at most
cpu_native.MAX_ROWS rows.
"""
from __future__ import annotations

import logging

from torch import Tensor, nn

from pdkernels import cpu_native
from pdkernels.cpu_decode_layers import DecodeLayers, DecodeShape, LayerTensors
from serving.models.causal_lm import CausalLM, HeadRMSNorm
from serving.models.cpu_linear import PackedLinear
from serving.models.tensor_parallel import RowParallelLinear

logger = logging.getLogger(__name__)


class NativeDecoder:
    def __init__(self, model: CausalLM, kv_cache: Tensor, layers: DecodeLayers, linears: list[PackedLinear],
                 first_layer: int = 0) -> None:
        self.model, self.kv_cache, self.layers = model, kv_cache, layers
        self.first_layer = first_layer  # a pipeline stage's first layer: the native table's layer 0
        self._bound = [(linear, linear.tiled_weight) for linear in linears]  # what the native table points into

    @classmethod
    def build(cls, model: CausalLM, kv_cache: Tensor) -> NativeDecoder | None:
        """A decoder bound to `model`'s current weights and `kv_cache` [L, 2, blocks, block_size, Hkv, D]
        (a pipeline stage: its layers only, and its cache of them); None (with the reason logged) where
        the model is not float32 on CPU with every linear layer packed (serving/models/cpu_linear.py),
        or the kernel library is not built."""
        lib = cpu_native.library()
        if lib is None:
            return None
        linears: list[PackedLinear] = []
        tensors = []
        first, held = _held_layers(model)
        for i, layer in enumerate(held):
            attn, mlp = layer.self_attn, layer.mlp
            projections = _projections(layer)
            if not all(isinstance(p, PackedLinear) and p.tiled_weight is not None for p in projections):
                logger.info("decode steps run the model's Python path: layer %d has a linear layer that is not "
                            "packed for pdserve's CPU kernels", i)
                return None
            if isinstance(attn.q_norm, HeadRMSNorm) != isinstance(attn.k_norm, HeadRMSNorm) \
                    or not isinstance(attn.q_norm, (HeadRMSNorm, nn.Identity)):
                logger.info("decode steps run the model's Python path: layer %d's q/k norms are not supported", i)
                return None
            has_norm = isinstance(attn.q_norm, HeadRMSNorm)
            linears += projections
            qkv, o, gate_up, down = projections
            tensors.append(LayerTensors(
                input_norm=layer.input_layernorm.weight.detach(), post_norm=layer.post_attention_layernorm.weight.detach(),
                qkv=qkv.tiled_weight, qkv_bias=_detached(qkv.bias),
                q_norm=attn.q_norm.weight.detach() if has_norm else None,
                k_norm=attn.k_norm.weight.detach() if has_norm else None,
                o=o.tiled_weight, o_bias=_detached(attn.o_proj.bias),  # a row-parallel one's: added after the sum
                gate_up=gate_up.tiled_weight, gate_up_bias=_detached(gate_up.bias),
                down=down.tiled_weight, down_bias=_detached(mlp.down_proj.bias),
                k_cache=kv_cache[i, 0], v_cache=kv_cache[i, 1]))  # (i: within the held layers)
        group = getattr(model, "tensor_parallel", None)
        collective = None
        if group is not None and group.size > 1:
            if group.shm is None:
                logger.info("decode steps run the model's Python path: the tensor-parallel group has no "
                            "shared-memory collectives")
                return None
            collective = group.shm.native()
        arch = model.config
        shape = DecodeShape(hidden=arch.hidden_size, num_q_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads,
                            head_dim=arch.head_dim, intermediate=arch.intermediate_size, block_size=kv_cache.shape[3],
                            eps=arch.rms_norm_eps, scale=arch.head_dim ** -0.5)
        try:
            layers = DecodeLayers(lib, tensors, shape, model.cos_sin_cache, collective)
        except ValueError as e:
            logger.info("decode steps run the model's Python path: %s", e)
            return None
        return cls(model, kv_cache, layers, linears, first)

    def is_current(self) -> bool:
        """The model still holds the weights this decoder was bound to (a repack or unpack rebinds)."""
        current = [p for layer in _held_layers(self.model)[1] for p in _projections(layer)]
        return len(current) == len(self._bound) and all(
            now is linear and linear.tiled_weight is tiled for now, (linear, tiled) in zip(current, self._bound))

    def serves(self, num_tokens: int, max_query_len: int, kv_cache: Tensor) -> bool:
        return 1 <= num_tokens <= cpu_native.MAX_ROWS and max_query_len == 1 and kv_cache is self.kv_cache

    def __call__(self, start_layer: int, end_layer: int, positions: Tensor, hidden_states: Tensor,
                 residual: Tensor | None, attn) -> tuple[Tensor, Tensor]:
        """CausalLM.run_layers for a decode step; `attn` is the runner's PagedAttentionBackend (its
        metadata is read, its call is not)."""
        meta = attn.meta
        first = self.first_layer
        return self.layers(start_layer - first, end_layer - first, hidden_states, residual, positions,
                           meta.slot_mapping, meta.block_tables, meta.seq_lens)


def _held_layers(model: CausalLM) -> tuple[int, list[nn.Module]]:
    """(first layer, the layers) this model holds: all, or a pipeline stage's."""
    stage = getattr(model, "pipeline_stage", None)
    if stage is None:
        return 0, list(model.layers)
    return stage.first_layer, list(model.layers[stage.first_layer:stage.end_layer])


def _projections(layer: nn.Module) -> tuple[nn.Module, ...]:
    """qkv, o, gate_up, down: the linear layers themselves (a tensor-parallel rank's row-parallel o and
    down unwrapped: the native step sums them over the group itself)."""
    attn, mlp = layer.self_attn, layer.mlp
    return attn.qkv_proj, _inner(attn.o_proj), mlp.gate_up_proj, _inner(mlp.down_proj)


def _inner(module: nn.Module) -> nn.Module:
    return module.linear if isinstance(module, RowParallelLinear) else module



def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()
