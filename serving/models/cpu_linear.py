"""A load-time transform for CPU: every linear layer's weight packed once into oneDNN's layout.

`F.linear` on CPU calls MKL's sgemm, which copies ("packs") the whole weight into its blocked layout
on every call with 2 or more rows, so a decode step at batch 2-8 reads each weight twice and writes it
once (bench/cpu_linear.py: 2-4x slower per call than at batch 1). vLLM's CPU backend instead reorders
each weight once into the layout oneDNN's matmul kernel wants (`csrc/cpu/dnnl_helper.cpp`: format
`any` chosen for M = 128) and reuses it; torch exposes the same primitive as
`torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise`, which inductor's freezing pass emits
for dynamic batch sizes. `pack_linears(model)` swaps each `nn.Linear` for a `PackedLinear` that runs
that matmul: the model code stays plain.

    nn.Linear.weight [N, K] (row-major)  --reorder once-->  oneDNN blocked weight (opaque, same bytes)
    forward: x [M, K] -> _linear_pointwise(x, packed, bias) -> [M, N]      (no per-call copy)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

# The M oneDNN chooses the weight's blocked layout for (vLLM's kProbeM). Every hint from 2 up gives the
# same layout here (AB16b64a on AVX-512); hint 1 keeps the plain one.
PACK_BATCH_HINT = 128
# At 1-2 rows MKL's kernel for w @ x.T (the plain weight as the big, untransposed operand, N = 2
# columns) streams the weight faster than oneDNN's matmul on the blocked one (bench/cpu_linear.py, one
# core: 15-18 GB/s against 10-13 for in_features 768; about even at 2048). From 3 rows on oneDNN wins
# everywhere. A single row is padded to two where that is faster than the M = 1 kernel (gemv).
PLAIN_MAX_ROWS = 2
PAD_ONE_ROW_MAX_IN_FEATURES = 1024


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN packing applies to float32 weights on CPU in a torch built with oneDNN."""
    return (torch.device(device).type == "cpu" and dtype == torch.float32
            and torch.backends.mkldnn.is_available())


class PackedLinear(nn.Module):
    """An nn.Linear whose matmul runs on a weight packed once for oneDNN (or, for 1-2 rows, on the plain
    weight through MKL's w @ x.T kernel).

    `weight` (and `bias`) stay the original Parameters, so ties, state_dict and `unpack_linears` see
    the same tensors; the packed copy is derived from them at construction and never updated. Both
    are kept: linear weights take twice their memory.
    """

    def __init__(self, linear: nn.Linear, batch_hint: int = PACK_BATCH_HINT) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight                                            # [N, K]
        self.bias = linear.bias                                                # [N] or None
        with torch.no_grad():
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), batch_hint)
        self.pad_one_row = self.in_features <= PAD_ONE_ROW_MAX_IN_FEATURES

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)                                 # [M, K]
        num_rows = rows.shape[0]
        if 0 < num_rows <= PLAIN_MAX_ROWS:
            if num_rows == 1 and self.pad_one_row:
                rows = torch.cat([rows, rows])                                 # [2, K]
            out = torch.mm(self.weight, rows.t())[:, :num_rows].t().contiguous()   # [N, M'] -> [M, N]
            if self.bias is not None:
                out += self.bias
        else:
            out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)                      # [..., N]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def to_linear(self) -> nn.Linear:
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight, linear.bias = self.weight, self.bias
        return linear


def pack_linears(model: nn.Module, batch_hint: int = PACK_BATCH_HINT) -> int:
    """Replace every float32 CPU nn.Linear in `model` by a PackedLinear, in place; returns how many.

    Mutates the module tree only: parameters are shared, not copied (the packed weights are extra
    memory, one more copy of each linear weight). A no-op where packing is not supported.
    """
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and packing_supported(child.weight.device, child.weight.dtype)]
    for parent, name, linear in targets:
        setattr(parent, name, PackedLinear(linear, batch_hint))
    return len(targets)


def unpack_linears(model: nn.Module) -> int:
    """The inverse of pack_linears (benchmarks compare both): plain nn.Linear back; returns how many."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, PackedLinear)]
    for parent, name, packed in targets:
        setattr(parent, name, packed.to_linear())
    return len(targets)
