"""A GPU tensor shared with another process of the same host: CUDA IPC, as torch.multiprocessing does it
(`reduce_tensor` / `rebuild_cuda_tensor`), with the fields sent in a protobuf message instead of a
pickle (a peer's bytes are never unpickled).

    owner:   export(kv_cache)  -> CudaIpcHandle  (cudaIpcGetMemHandle of the allocation, torch's
                                                   reference counter and event, the device's UUID)
    peer:    open_tensor(handle, shape, dtype) -> a tensor over the owner's memory, on the peer's
                                           index of the same GPU (CUDA_VISIBLE_DEVICES may number it
                                           otherwise)

The owner keeps its tensor for as long as peers may write (a decode instance's KV pool lives as long as
the instance). A peer that cannot see the GPU, or a driver that refuses the handle, gets a RuntimeError
and falls back to sending payloads. Opening a handle in the process that exported it fails (CUDA's
rule): tests run owner and peer as separate processes.
"""
from __future__ import annotations

import torch

from kvcache.transfer._proto import kv_transfer_pb2 as pb


def device_uuid(device: torch.device | int) -> str:
    index = device if isinstance(device, int) else (device.index if device.index is not None else 0)
    return str(torch.cuda.get_device_properties(index).uuid)


def local_index(uuid: str) -> int | None:
    """This process's index of the GPU with that UUID, or None where it is not visible."""
    for index in range(torch.cuda.device_count()):
        if device_uuid(index) == uuid:
            return index
    return None


def export(tensor: torch.Tensor) -> pb.CudaIpcHandle:
    """A handle a peer process opens with `open_tensor` (one per peer: each carries its own reference
    count)."""
    if not tensor.is_cuda or not tensor.is_contiguous():
        raise ValueError("only a contiguous CUDA tensor can be exported")
    (device, handle, storage_size, storage_offset, ref_counter_handle, ref_counter_offset, event_handle,
     event_sync_required) = tensor.untyped_storage()._share_cuda_()
    return pb.CudaIpcHandle(device_uuid=device_uuid(device), handle=handle, storage_size_bytes=storage_size,
                            storage_offset_bytes=storage_offset, ref_counter_handle=ref_counter_handle,
                            ref_counter_offset=ref_counter_offset, event_handle=event_handle or b"",
                            event_sync_required=event_sync_required, tensor_offset=tensor.storage_offset())


def open_tensor(handle: pb.CudaIpcHandle, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The exported tensor in this process (RuntimeError where it cannot be opened)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the peer's KV pool is GPU memory and this process has no CUDA device")
    index = local_index(handle.device_uuid)
    if index is None:
        raise RuntimeError(f"the peer's KV pool is on GPU {handle.device_uuid}, which this process cannot see")
    numel = 1
    for size in shape:
        numel *= size
    if (handle.tensor_offset + numel) * dtype.itemsize > handle.storage_size_bytes:
        raise ValueError(f"the peer's exported memory ({handle.storage_size_bytes} bytes) does not hold a "
                         f"{tuple(shape)} {dtype} tensor at element {handle.tensor_offset}")
    from torch.multiprocessing.reductions import rebuild_cuda_tensor
    stride, step = [], 1
    for size in reversed(shape):
        stride.insert(0, step)
        step *= size
    # torch's own rebuild (what a torch.multiprocessing queue runs): opens the handle once per process
    # and gives the owner's reference counter back when the tensor is freed here
    return rebuild_cuda_tensor(torch.Tensor, torch.Size(shape), tuple(stride), handle.tensor_offset,
                               torch.storage.TypedStorage, dtype, index, handle.handle, handle.storage_size_bytes,
                               handle.storage_offset_bytes, False, handle.ref_counter_handle,
                               handle.ref_counter_offset, handle.event_handle or None, handle.event_sync_required)
