"""A load-time transform for CPU: every linear layer's weight laid out once for the kernels that run it.

`F.linear` on CPU calls MKL's sgemm, which copies ("packs") the whole weight into its blocked layout
on every call with 2 or more rows, so a decode step at batch 2-8 reads each weight twice and writes it
once (bench/cpu_linear.py: 2-4x slower per call than at batch 1). vLLM's CPU backend instead reorders
each weight once into the layout oneDNN's matmul kernel wants (`csrc/cpu/dnnl_helper.cpp`: format
`any` chosen for M = 128) and reuses it; torch exposes the same primitive as
`torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise`. That is what prefill-sized calls
run here. Decode-sized calls (1-8 rows) run pdserve's own kernel (pdkernels/cpu_native.py) on the
weight laid out in tiles two vector registers wide (32 columns with AVX-512, 16 with AVX2), which
streams it at 20-28 GB/s where oneDNN reads 11-18 (AVX-512 host; 1.3-1.7x the best of torch's paths
at 2-8 rows on an AVX2 one: docs/kernels.md).
`pack_linears(model)` swaps each `nn.Linear` for a `PackedLinear`: the model code stays plain.

    nn.Linear.weight [N, K] --once--> oneDNN blocked weight   (M > 8 rows, or no kernel library)
                            --once--> tiled [N/T, K, T]       (1-8 rows; T = cpu_native.tile_width())
    the plain weight is then dropped unless another module shares it (a tied LM head): two copies
    of each weight, as before; `.weight` rebuilds it (bit-identical) for whoever asks

Without the kernel library (no compiler; PDSERVE_CPU_KERNELS=0) 1-2 rows take MKL's w @ x.T on the
plain weight, which is then kept.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pdkernels import cpu_native

# The M oneDNN chooses the weight's blocked layout for (vLLM's kProbeM). Every hint from 2 up gives the
# same layout here (AB16b64a on AVX-512); hint 1 keeps the plain one.
PACK_BATCH_HINT = 128
# Without the kernel library: at 1-2 rows MKL's kernel for w @ x.T (the plain weight as the big,
# untransposed operand, N = 2 columns) streams the weight faster than oneDNN's matmul on the blocked
# one (bench/cpu_linear.py, one core: 15-18 GB/s against 10-13 for in_features 768; about even at
# 2048). From 3 rows on oneDNN wins everywhere. A single row is padded to two where that is faster
# than the M = 1 kernel (gemv).
PLAIN_MAX_ROWS = 2
PAD_ONE_ROW_MAX_IN_FEATURES = 1024


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN packing applies to float32 weights on CPU in a torch built with oneDNN."""
    return (torch.device(device).type == "cpu" and dtype == torch.float32
            and torch.backends.mkldnn.is_available())


class PackedLinear(nn.Module):
    """An nn.Linear whose matmul runs on a weight laid out once: pdserve's small-M kernel on the tiled
    weight for 1-8 rows, oneDNN on its packed weight for more (without the kernel library, MKL's
    w @ x.T on the plain weight for 1-2 rows).

    `bias` stays the original Parameter. The plain weight is kept (as `plain_weight`) only where the
    kernel library is missing or `keep_plain` is set (another module shares it: a tied LM head);
    `.weight` returns it, or rebuilds it from the tiled copy. The derived copies are never updated.
    """

    def __init__(self, linear: nn.Linear, batch_hint: int = PACK_BATCH_HINT, keep_plain: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias                                                # [N] or None
        weight = linear.weight.detach()                                        # [N, K]
        with torch.no_grad():
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        self.kernels = cpu_native.library()
        self.tiled_weight = cpu_native.tile_weight(weight) if self.kernels is not None else None
        self.plain_weight = linear.weight if keep_plain or self.kernels is None else None
        self.pad_one_row = self.in_features <= PAD_ONE_ROW_MAX_IN_FEATURES

    @property
    def weight(self) -> Tensor:
        """The [N, K] weight: the original Parameter where kept, else rebuilt from the tiled copy."""
        if self.plain_weight is not None:
            return self.plain_weight
        return nn.Parameter(cpu_native.untile_weight(self.tiled_weight, self.out_features), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)                                 # [M, K]
        num_rows = rows.shape[0]
        if self.tiled_weight is not None and 0 < num_rows <= cpu_native.MAX_ROWS:
            out = cpu_native.linear(self.kernels, rows, self.tiled_weight, self.bias, self.out_features)
        elif self.tiled_weight is None and 0 < num_rows <= PLAIN_MAX_ROWS:
            if num_rows == 1 and self.pad_one_row:
                rows = torch.cat([rows, rows])                                 # [2, K]
            out = torch.mm(self.plain_weight, rows.t())[:, :num_rows].t().contiguous()  # [N, M'] -> [M, N]
            if self.bias is not None:
                out += self.bias
        else:
            out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)                      # [..., N]

    def extra_repr(self) -> str:
        path = "small-M kernel + oneDNN" if self.tiled_weight is not None else "MKL + oneDNN"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {path}")

    def to_linear(self) -> nn.Linear:
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight, linear.bias = self.weight, self.bias
        return linear


def pack_linears(model: nn.Module, batch_hint: int = PACK_BATCH_HINT) -> int:
    """Replace every float32 CPU nn.Linear in `model` by a PackedLinear, in place; returns how many.

    Mutates the module tree only. Each weight ends up in two copies (oneDNN's and the tiled one; the
    plain weight is dropped unless another module shares it, or the kernel library is missing). A
    no-op where packing is not supported.
    """
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and packing_supported(child.weight.device, child.weight.dtype)]
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    for parent, name, linear in targets:
        setattr(parent, name, PackedLinear(linear, batch_hint, keep_plain=uses[id(linear.weight)] > 1))
    return len(targets)


def unpack_linears(model: nn.Module) -> int:
    """The inverse of pack_linears (benchmarks compare both): plain nn.Linear back, with the original
    weight Parameter where it was kept, else one rebuilt bit-identical from the tiled copy; returns how many."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, PackedLinear)]
    for parent, name, packed in targets:
        setattr(parent, name, packed.to_linear())
    return len(targets)
