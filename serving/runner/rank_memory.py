"""The shared memory of a group of ranks on one host: each TP group's collectives region (rank 0 creates
it, every rank maps it), and, in an instance that moves KV, ranks 1..'s KV caches (rank 0 creates and
maps them too: the instance's KV transfer endpoint is rank 0).
"""
from __future__ import annotations

import logging

import torch

from serving.models.tensor_parallel import ShmCollectives

logger = logging.getLogger(__name__)


def map_cache(name: str, layout, num_blocks: int) -> torch.Tensor:
    """This rank's KV cache in the shared-memory file rank 0 made for it (rank 0's KV transfer reads
    and writes it there)."""
    from kvcache.shared_memory import map_region
    region = map_region(name, 0, num_blocks * layout.bytes_per_block, True)
    return torch.frombuffer(region, dtype=getattr(torch, layout.dtype)).view(layout.shape(num_blocks))


class SharedRankCaches:
    """The KV caches of ranks 1.. of a group in shared-memory files rank 0 creates, so that rank 0's
    process, the instance's KV transfer endpoint, reads (prefill) and writes (decode) every rank's heads
    (kvcache/transfer/plans.py). Host memory only; the names go at close(), the mappings with the
    processes."""

    PREFIX = "pdkvrank"

    def __init__(self, layouts: list, num_blocks: int) -> None:
        """layouts: the KVCacheLayout of ranks 1.. (each its stage's layers, its heads)."""
        from kvcache.shared_memory import SharedFile, map_own
        self.files, self.tensors = [], []
        try:
            for layout in layouts:
                shared = SharedFile(self.PREFIX, num_blocks * layout.bytes_per_block)
                self.files.append(shared)
                self.tensors.append(torch.frombuffer(map_own(shared), dtype=getattr(torch, layout.dtype)
                                                     ).view(layout.shape(num_blocks)))
        except OSError as e:
            self.close()
            total = sum(num_blocks * layout.bytes_per_block for layout in layouts)
            raise RuntimeError(f"a prefill or decode instance of several ranks keeps their KV caches in shared "
                               f"memory, and /dev/shm cannot hold {total / 2**20:.0f} MiB of them ({e}): "
                               "enlarge it (docker run --shm-size) or lower --kv-cache-memory-bytes") from e

    @property
    def names(self) -> list[str]:
        return [shared.name for shared in self.files]

    def close(self) -> None:
        for shared in self.files:
            shared.close()


def attach_collectives_region(name: str, tp_rank: int, tp: int, slot_bytes: int, timeout_s: float) -> ShmCollectives:
    """A worker rank's view of its TP group's collectives region, which rank 0 created."""
    from pdkernels import cpu_native
    from kvcache.shared_memory import map_region
    lib = cpu_native.library()
    if lib is None:
        raise RuntimeError("rank 0 uses shared-memory collectives but this rank cannot load pdserve's CPU kernels")
    region = map_region(name, 0, ShmCollectives.region_bytes(lib, tp, slot_bytes), True)
    return ShmCollectives(lib, region, tp_rank, tp, slot_bytes, timeout_s)


def create_collectives_region(device: torch.device, size: int, timeout_s: float):
    """(SharedFile, ShmCollectives of rank 0) for a CPU group, or (None, None): on CUDA, without the
    kernel library, or where /dev/shm cannot hold the region (then gloo carries every collective)."""
    if device.type != "cpu":
        return None, None
    from pdkernels import cpu_native
    from kvcache.shared_memory import SharedFile, map_own
    lib = cpu_native.library()
    if lib is None:
        return None, None
    slot_bytes = ShmCollectives.DEFAULT_SLOT_BYTES
    try:
        shared = SharedFile("pdservetp", ShmCollectives.region_bytes(lib, size, slot_bytes))
    except OSError as e:
        logger.warning("tensor-parallel collectives go through gloo: no shared-memory region (%s)", e)
        return None, None
    return shared, ShmCollectives(lib, map_own(shared), 0, size, slot_bytes, timeout_s)
