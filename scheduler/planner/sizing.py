"""What a model needs of a device: weights, KV blocks, and which parallel plans fit at all.

`ModelShape` is the plain description the planner and simulator need (bench/ builds it from the
model directory's config.json). Memory of one instance of plan tp x pp, per device:

    usable      device_memory x memory_utilization          (the rest: activations, workspace)
    weights     params x dtype_bytes / (tp x pp)            (embeddings and LM head counted as if
                                                             spread evenly over the stages)
    KV blocks   (usable − weights) // bytes of one block on one rank
                one rank holds ⌈L/pp⌉ layers and its share of the KV heads (KVCacheLayout.rank_slice:
                H/tp heads, or one replicated head when tp > H)

Every rank of an instance holds the same block ids, so this is the instance's number of blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvcache.layout import KVCacheLayout

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


def dtype_bytes(dtype: str) -> int:
    if dtype not in _ITEMSIZE:
        raise ValueError(f"dtype must be one of {', '.join(_ITEMSIZE)}, got {dtype!r}")
    return _ITEMSIZE[dtype]


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False

    @property
    def num_params(self) -> int:
        """Dense decoder: embeddings, attention (q, k, v, o), gated MLP (3 matrices), norms, LM head."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h
        mlp = 3 * h * self.intermediate_size
        layer = attention + mlp + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embeddings + h

    def weight_bytes(self, dtype: str) -> int:
        return self.num_params * dtype_bytes(dtype)

    def kv_layout(self, block_size: int, dtype: str, tp: int = 1, pp: int = 1) -> KVCacheLayout:
        """One rank's KV layout under tp x pp (tp 1, pp 1: the whole model's)."""
        layers = -(-self.num_layers // pp)
        return KVCacheLayout.for_model(layers, self.num_kv_heads, self.head_dim, block_size, dtype, tp, 0)

    def kv_bytes_per_token(self, dtype: str) -> int:
        """K and V of one token in every layer, all heads (what moves from prefill to decode)."""
        return self.kv_layout(1, dtype).bytes_per_block


def plan_problem(shape: ModelShape, tp: int, pp: int, devices_per_node: int) -> str | None:
    """Why tp x pp cannot run this model on such nodes (None: it can). TP stays within a node."""
    if tp > devices_per_node:
        return f"tp={tp} exceeds the {devices_per_node} devices of a node (tensor parallelism stays in a node)"
    heads = shape.num_kv_heads
    if (tp <= heads and heads % tp) or (tp > heads and tp % heads):
        return f"tp={tp} neither divides nor is a multiple of the model's {heads} KV heads"
    if shape.num_heads % tp:
        return f"tp={tp} does not divide the model's {shape.num_heads} attention heads"
    if pp > shape.num_layers:
        return f"pp={pp} exceeds the model's {shape.num_layers} layers"
    return None


def num_kv_blocks(shape: ModelShape, tp: int, pp: int, device_memory_bytes: int, memory_utilization: float,
                  block_size: int, dtype: str) -> int:
    """KV blocks of one instance of plan tp x pp (0 or less: the weights do not fit)."""
    usable = device_memory_bytes * memory_utilization
    weights = shape.weight_bytes(dtype) / (tp * pp)
    per_block = shape.kv_layout(block_size, dtype, tp, pp).bytes_per_block
    return int((usable - weights) // per_block)
