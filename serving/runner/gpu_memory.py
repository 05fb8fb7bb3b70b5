"""The KV pool's size on a GPU from --gpu-memory-utilization (vLLM's flag), when no --kv-cache-memory-bytes
is given: the instance may take `utilization` of the GPU's memory in all, and the pool gets what is left
of that after what is in use when the model has loaded (its weights, the CUDA context, anything else on
the GPU) and the peak of a step's activations:

    pool = utilization x total - (total - free after the weights) - activations

vLLM measures the activations with a profiling forward pass; here they are priced from the model's
shapes for a step of --max-num-batched-tokens tokens (the largest tensors a layer holds at once, the
logits and sampling buffers of --max-num-seqs rows), with a margin; the CUDA graphs of decode steps
(a few MiB for small batches) come out of the rest.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

ACTIVATION_MARGIN = 2.0  # the estimate below counts the large tensors once; allocator slack, temporaries


def activation_bytes(arch, num_tokens: int, max_num_seqs: int, dtype_bytes: int, tp_size: int = 1) -> int:
    """What one step of num_tokens tokens holds at its peak beyond the weights and the KV pool, with
    ACTIVATION_MARGIN: per token the residual stream, a norm's output, the fused qkv projection and the
    attention output, the fused gate/up projection and its activation (a rank's share of the heads and
    of the MLP with tp_size ranks); and the float32 logits of max_num_seqs rows twice (logits, sampling)."""
    per_token = (4 * arch.hidden_size + (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim // tp_size
                 + arch.num_heads * arch.head_dim // tp_size + 3 * arch.intermediate_size // tp_size)
    logits = 2 * max_num_seqs * arch.vocab_size * 4
    return int(ACTIVATION_MARGIN * (num_tokens * per_token * dtype_bytes + logits))


def kv_budget_from_utilization(total: int, free: int, activations: int, utilization: float) -> int:
    """Bytes for the KV pool (ValueError saying what to change when nothing is left)."""
    in_use = total - free
    budget = int(utilization * total) - in_use - activations
    if budget <= 0:
        raise ValueError(
            f"--gpu-memory-utilization {utilization:g} of the GPU's {total / 2**30:.1f} GiB leaves no room for the "
            f"KV cache: {in_use / 2**30:.2f} GiB are in use after loading the model (its weights, the CUDA context "
            f"and anything else on this GPU) and a step's activations need about {activations / 2**30:.2f} GiB; "
            "raise --gpu-memory-utilization, lower --max-num-batched-tokens or --max-num-seqs, or give "
            "--kv-cache-memory-bytes")
    return budget


def gpu_kv_budget(arch, device: torch.device, utilization: float, num_tokens: int, max_num_seqs: int,
                  dtype: torch.dtype, tp_size: int = 1) -> int:
    """The KV pool's budget on `device` (this rank's) now that the model's weights are there."""
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    activations = activation_bytes(arch, num_tokens, max_num_seqs, dtype.itemsize, tp_size)
    budget = kv_budget_from_utilization(total, free, activations, utilization)
    logger.info("KV cache budget %.2f GiB: --gpu-memory-utilization %g of %.1f GiB, less %.2f GiB in use and "
                "%.2f GiB for activations", budget / 2**30, utilization, total / 2**30, (total - free) / 2**30,
                activations / 2**30)
    return budget
