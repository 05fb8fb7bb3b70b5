"""Kernel tests run the Triton kernels compiled on CUDA, or under Triton's interpreter on CPU.

triton.jit picks interpreter or compiler when a kernel is decorated, so the switch must be set before
any kernels.triton_* module is imported: here, at collection time, never in library code.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
