"""A decode step's decoder layers in one native call (pdkernels/csrc/cpu_decode_layers.cpp): float32, CPU,
1-8 rows of one new token each.

The driver chains the same compiled kernels the model's Python path dispatches to (pdkernels/ops.py ->
pdkernels/cpu_native.py), in the same order on the same inputs, so its output is bit-identical; what it
removes is the ~200 Python-level calls per step (modules, wrappers, their checks), ~3 ms of a ~20 ms
batch-1 step on the small model.

    DecodeLayers(lib, [LayerTensors per layer], DecodeShape(...), cos_sin)      once, at load
    layers(start, end, hidden [M, H], residual [M, H] | None, positions [M], slots [M],
           block_tables [M, W] int32, seq_lens [M] int32) -> (hidden, residual)   per step

Each layer's tensors are bound once (pointers in a ctypes table); the object holds a reference to
every tensor it points into, so they outlive it whatever happens to the module tree.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from pdkernels import cpu_native


@dataclass(frozen=True)
class LayerTensors:
    """One decoder layer's tensors: linear weights tiled by cpu_native.tile_weight; None for an absent
    bias or q/k norm. k_cache / v_cache are the layer's [num_blocks, block_size, Hkv, D] caches."""
    input_norm: Tensor
    post_norm: Tensor
    qkv: Tensor
    qkv_bias: Tensor | None
    q_norm: Tensor | None
    k_norm: Tensor | None
    o: Tensor
    o_bias: Tensor | None
    gate_up: Tensor
    gate_up_bias: Tensor | None
    down: Tensor
    down_bias: Tensor | None
    k_cache: Tensor
    v_cache: Tensor


class _Layer(ctypes.Structure):  # PdserveLayer, field for field
    _fields_ = [(f.name, ctypes.c_void_p) for f in fields(LayerTensors)]


@dataclass(frozen=True)
class DecodeShape:
    hidden: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    block_size: int
    eps: float
    scale: float
    is_neox: bool = True


class _Shape(ctypes.Structure):  # PdserveDecodeShape
    _fields_ = [(name, ctypes.c_int64) for name in ("hidden", "num_q_heads", "num_kv_heads", "head_dim", "intermediate",
                                                    "rot_dim", "max_position", "is_neox", "block_size", "num_slots")
                ] + [("eps", ctypes.c_float), ("scale", ctypes.c_float)]


@dataclass(frozen=True)
class NativeCollective:
    """A tensor-parallel rank's shared-memory collectives as the native layers call them: after o and
    down the rank's partial output is summed over the group (pdkernels/csrc/cpu_shm_collectives.cpp), then
    the bias added. `seq` is the group's collective counter, shared with whoever else makes collectives
    on the group, so every call, native or not, takes the next number."""
    base: int  # address of the group's mapped region
    rank: int
    size: int
    seq: ctypes.c_uint64
    timeout_s: float


class _Collective(ctypes.Structure):  # PdserveCollective
    _fields_ = [("base", ctypes.c_void_p), ("rank", ctypes.c_int32), ("size", ctypes.c_int32),
                ("seq", ctypes.POINTER(ctypes.c_uint64)), ("timeout_s", ctypes.c_double)]


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class DecodeLayers:
    """Decoder layers bound to their tensors for decode steps of 1 to cpu_native.MAX_ROWS rows."""

    def __init__(self, lib: ctypes.CDLL, layers: list[LayerTensors], shape: DecodeShape, cos_sin: Tensor,
                 collective: NativeCollective | None = None) -> None:
        """Checks every tensor's dtype, layout and size once; raises ValueError naming the first that
        does not fit (callers then keep the Python path). collective: a tensor-parallel rank's (its
        layers then hold the rank's shard: o and down row-parallel, biases added after the sum)."""
        self.lib, self.shape, self.layers = lib, shape, list(layers)
        self.collective = collective
        self._collective = None if collective is None else _Collective(
            collective.base, collective.rank, collective.size, ctypes.pointer(collective.seq), collective.timeout_s)
        self.cos_sin = cos_sin
        s = shape
        q, kv = s.num_q_heads * s.head_dim, s.num_kv_heads * s.head_dim
        rot_dim = cos_sin.shape[1]
        if s.head_dim > cpu_native.MAX_HEAD_DIM or rot_dim > s.head_dim or rot_dim % 2 or s.num_q_heads % s.num_kv_heads:
            raise ValueError(f"decode layers serve head_dim <= {cpu_native.MAX_HEAD_DIM}, an even rot_dim <= "
                             f"head_dim and Hkv dividing Hq; got {s}, rot_dim {rot_dim}")
        expected = {"input_norm": (s.hidden,), "post_norm": (s.hidden,), "qkv": _tiled(q + 2 * kv, s.hidden),
                    "qkv_bias": (q + 2 * kv,), "q_norm": (s.head_dim,), "k_norm": (s.head_dim,),
                    "o": _tiled(s.hidden, q), "o_bias": (s.hidden,), "gate_up": _tiled(2 * s.intermediate, s.hidden),
                    "gate_up_bias": (2 * s.intermediate,), "down": _tiled(s.hidden, s.intermediate),
                    "down_bias": (s.hidden,)}
        num_blocks = layers[0].k_cache.shape[0] if layers else 0
        cache_shape = (num_blocks, s.block_size, s.num_kv_heads, s.head_dim)
        for i, layer in enumerate(layers):
            if (layer.q_norm is None) != (layer.k_norm is None):
                raise ValueError(f"layer {i}: q_norm and k_norm come together")
            for name, want in [*expected.items(), ("k_cache", cache_shape), ("v_cache", cache_shape)]:
                t = getattr(layer, name)
                if t is not None and not (tuple(t.shape) == want and cpu_native.float32_cpu(t) and t.is_contiguous()):
                    raise ValueError(f"layer {i}: {name} must be a contiguous float32 CPU tensor of shape {want}, "
                                     f"got {tuple(t.shape)} {t.dtype} on {t.device}")
        if not (cpu_native.float32_cpu(cos_sin) and cos_sin.is_contiguous()):
            raise ValueError("the rotary table must be a contiguous float32 CPU tensor")
        self._table = (_Layer * len(layers))(*[_Layer(*[_ptr(getattr(layer, f.name)) for f in fields(LayerTensors)])
                                               for layer in layers])
        self._shape = _Shape(s.hidden, s.num_q_heads, s.num_kv_heads, s.head_dim, s.intermediate, rot_dim,
                             cos_sin.shape[0], int(s.is_neox), s.block_size, num_blocks * s.block_size, s.eps, s.scale)
        # one scratch area per row count, allocated here and reused (a fresh one each step
        # page-faults its memory in again); calls on one object must not overlap (a runner's steps don't)
        self._scratch = [torch.empty(lib.pdserve_decode_layers_scratch(ctypes.byref(self._shape), m), dtype=torch.float32)
                         if m else None for m in range(cpu_native.MAX_ROWS + 1)]

    def __call__(self, start: int, end: int, hidden: Tensor, residual: Tensor | None, positions: Tensor,
                 slots: Tensor, block_tables: Tensor, seq_lens: Tensor) -> tuple[Tensor, Tensor]:
        """Layers [start, end) over M rows; returns new (hidden, residual) [M, H]. residual None means
        `start` is the model's first layer. Mutates only the KV cache (this step's slots).

        positions/slots [M] int64, block_tables [M, W] int32 whose first ceil(seq_len / block_size)
        entries are the request's blocks, seq_lens [M] int32 (context including this token).
        """
        num_rows = hidden.shape[0]
        if not (1 <= num_rows <= cpu_native.MAX_ROWS and 0 <= start < end <= len(self.layers)):
            raise ValueError(f"decode layers take 1-{cpu_native.MAX_ROWS} rows and a layer range within "
                             f"{len(self.layers)}; got {num_rows} rows, [{start}, {end})")
        out = hidden.to(torch.float32).contiguous().clone()                          # [M, H], updated in place
        res = torch.empty_like(out) if residual is None else residual.contiguous().clone()
        positions, slots = positions.to(torch.int64).contiguous(), slots.to(torch.int64).contiguous()
        tables, lens = block_tables.to(torch.int32).contiguous(), seq_lens.to(torch.int32).contiguous()
        needed = -(-int(lens.max()) // self.shape.block_size)
        if (out.shape[1] != self.shape.hidden or res.shape != out.shape or positions.shape != (num_rows,)
                or slots.shape != (num_rows,) or lens.shape != (num_rows,) or tables.dim() != 2
                or tables.shape[0] != num_rows or tables.shape[1] < needed):
            raise ValueError(f"decode layers: hidden/residual [M, {self.shape.hidden}], positions/slots/seq_lens [M] "
                             f"and block_tables [M, >= {needed}] for M = {num_rows}; got {tuple(hidden.shape)}, "
                             f"{tuple(positions.shape)}, {tuple(slots.shape)}, {tuple(seq_lens.shape)}, "
                             f"{tuple(block_tables.shape)}")
        scratch = self._scratch[num_rows]
        status = self.lib.pdserve_decode_layers(
            ctypes.byref(self._table, start * ctypes.sizeof(_Layer)), end - start, ctypes.byref(self._shape),
            num_rows, out.data_ptr(), res.data_ptr(), int(residual is not None), positions.data_ptr(),
            slots.data_ptr(), tables.data_ptr(), tables.shape[1], lens.data_ptr(), self.cos_sin.data_ptr(),
            scratch.data_ptr(), torch.get_num_threads(),
            None if self._collective is None else ctypes.byref(self._collective))
        if status == -2:
            raise ValueError(f"a position is outside the rotary table's {self.cos_sin.shape[0]} positions")
        if status == -3:
            raise IndexError(f"a slot is past the cache's {self._shape.num_slots} slots")
        if status == -4:
            raise RuntimeError("a tensor-parallel peer rank is gone or late: the shared-memory all-reduce of the "
                               "native decode step failed")
        if status != 0:
            raise RuntimeError(f"pdserve_decode_layers returned {status}")
        return out, res


def _tiled(out_features: int, in_features: int) -> tuple[int, int, int]:
    tile = cpu_native.tile_width()
    return (-(-out_features // tile), in_features, tile)
