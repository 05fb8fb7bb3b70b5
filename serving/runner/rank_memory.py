"""The shared memory of a group of ranks on one host: each TP group's collectives region (rank 0 creates
it, every rank maps it), and, in an instance that moves KV, ranks 1..'s KV caches, which rank 0 maps too
(the instance's KV transfer endpoint is rank 0): in host memory, shared-memory files rank 0 creates; on
GPUs, each rank's own allocation, which it exports to rank 0 by CUDA IPC (kvcache/cuda_ipc.py).

    rank 0                                      rank r (1..)
    ready(): sizes + CUDA_IPC_CACHES  ------->  rank_cache(): allocate on its GPU, export
             open_rank_cache() <--------------  ("ready", (pid, CudaIpcHandle bytes))
"""
from __future__ import annotations

import logging

import torch

from serving.models.tensor_parallel import ShmCollectives

logger = logging.getLogger(__name__)


# the cache name ready() sends ranks on CUDA in an instance that moves KV: allocate your cache on your GPU
# and export it (there is no file to map)
CUDA_IPC_CACHES = "cuda-ipc"


def rank_cache(cache_name: str | None, layout, num_blocks: int, device: torch.device):
    """(a worker rank's KV cache, the CudaIpcHandle bytes rank 0 opens it with, or None): its own
    allocation (no name), the shared-memory file rank 0 made for it, or, on CUDA (CUDA_IPC_CACHES), an
    allocation on its GPU exported to rank 0, which keeps it for the rank's life."""
    if cache_name == CUDA_IPC_CACHES:
        from kvcache import cuda_ipc
        kv_cache = layout.allocate(num_blocks, device)
        return kv_cache, cuda_ipc.export(kv_cache).SerializeToString()
    if cache_name:
        return map_cache(cache_name, layout, num_blocks), None
    return layout.allocate(num_blocks, device), None


def open_rank_cache(rank: int, handle: bytes | None, layout, num_blocks: int) -> torch.Tensor:
    """Rank `rank`'s KV cache in rank 0's process, from the handle it exported (RuntimeError, saying what
    to change, where it cannot be opened)."""
    from kvcache import cuda_ipc
    from kvcache.transfer._proto import kv_transfer_pb2 as pb
    if not handle:
        raise RuntimeError(f"tensor-parallel rank {rank} did not export its KV cache")
    try:
        return cuda_ipc.open_tensor(pb.CudaIpcHandle.FromString(handle), layout.shape(num_blocks),
                                    getattr(torch, layout.dtype))
    except RuntimeError as e:
        raise RuntimeError(f"rank 0 of a prefill or decode instance maps every rank's KV cache and cannot open "
                           f"rank {rank}'s ({e}): run the instance's ranks as processes of one host that see "
                           "every GPU of the instance (the local launcher), or with one rank") from e


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
