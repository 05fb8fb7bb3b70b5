"""glibc malloc settings for a process that runs model steps on CPU.

Every step allocates and frees the same large temporaries: decode attention's gathered K and V
(batch x context x Hkv x D floats, per layer), the linear layers' outputs, SDPA's buffers. By default
glibc serves blocks above its mmap threshold (128 KiB, raised on the fly up to 32 MiB) with fresh
mmap'ed pages that go back to the kernel on free, and trims the top of the heap once 128 KiB of it is
free. So each step faults its temporaries in again, page by page, and the kernel zeroes every page:
on the 2-core box, small model, 11,904 minor faults and ~30 ms of kernel time per decode step at batch
8 x 256 context (of ~110 ms), 61,000 faults and ~140 ms at batch 64 x 160 (docs/benchmarks.md, "CPU
step"). Serving blocks below 32 MiB from the heap and keeping up to 1 GiB of it after frees removes
them (0 faults per step). The cost is memory the process keeps instead of returning: at most the
step's peak of temporaries below 32 MiB each.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD_BYTES = 2**30


def keep_step_memory() -> bool:
    """Set glibc's mmap and trim thresholds for the whole process (idempotent); False where malloc is
    not glibc's (the settings are then left as they are)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                 TRIM_THRESHOLD_BYTES))
    if not ok:
        logger.warning("mallopt refused the mmap/trim thresholds: CPU steps will page-fault their temporaries")
    return ok
