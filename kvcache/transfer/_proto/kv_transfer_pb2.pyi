from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVLayout(_message.Message):
    __slots__ = ("model_fingerprint", "dtype", "block_size", "num_layers", "num_kv_heads", "head_dim", "tp_size", "tp_rank", "total_kv_heads", "pp_size", "pp_partition")
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TOTAL_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    PP_SIZE_FIELD_NUMBER: _ClassVar[int]
    PP_PARTITION_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tp_size: int
    tp_rank: int
    total_kv_heads: int
    pp_size: int
    pp_partition: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model_fingerprint: _Optional[str] = ..., dtype: _Optional[str] = ..., block_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., tp_size: _Optional[int] = ..., tp_rank: _Optional[int] = ..., total_kv_heads: _Optional[int] = ..., pp_size: _Optional[int] = ..., pp_partition: _Optional[_Iterable[int]] = ...) -> None: ...

class HandshakeRequest(_message.Message):
    __slots__ = ("layout", "host_id", "sender_id", "want_shm", "want_one_sided", "pid", "pid_namespace")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    WANT_SHM_FIELD_NUMBER: _ClassVar[int]
    WANT_ONE_SIDED_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    PID_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    layout: KVLayout
    host_id: str
    sender_id: str
    want_shm: bool
    want_one_sided: bool
    pid: int
    pid_namespace: str
    def __init__(self, layout: _Optional[_Union[KVLayout, _Mapping]] = ..., host_id: _Optional[str] = ..., sender_id: _Optional[str] = ..., want_shm: _Optional[bool] = ..., want_one_sided: _Optional[bool] = ..., pid: _Optional[int] = ..., pid_namespace: _Optional[str] = ...) -> None: ...

class SharedPool(_message.Message):
    __slots__ = ("name", "kv_bytes", "num_blocks", "tickets_offset", "progress_offset", "num_slots", "control_bytes", "cuda")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TICKETS_OFFSET_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NUM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    CONTROL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CUDA_FIELD_NUMBER: _ClassVar[int]
    name: str
    kv_bytes: int
    num_blocks: int
    tickets_offset: int
    progress_offset: int
    num_slots: int
    control_bytes: int
    cuda: CudaIpcHandle
    def __init__(self, name: _Optional[str] = ..., kv_bytes: _Optional[int] = ..., num_blocks: _Optional[int] = ..., tickets_offset: _Optional[int] = ..., progress_offset: _Optional[int] = ..., num_slots: _Optional[int] = ..., control_bytes: _Optional[int] = ..., cuda: _Optional[_Union[CudaIpcHandle, _Mapping]] = ...) -> None: ...

class CudaIpcHandle(_message.Message):
    __slots__ = ("device_uuid", "handle", "storage_size_bytes", "storage_offset_bytes", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required", "tensor_offset")
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_OFFSET_FIELD_NUMBER: _ClassVar[int]
    device_uuid: str
    handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    tensor_offset: int
    def __init__(self, device_uuid: _Optional[str] = ..., handle: _Optional[bytes] = ..., storage_size_bytes: _Optional[int] = ..., storage_offset_bytes: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ..., tensor_offset: _Optional[int] = ...) -> None: ...

class HandshakeResponse(_message.Message):
    __slots__ = ("layout", "host_id", "shm_ok", "max_chunk_bytes", "pool")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    SHM_OK_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    layout: KVLayout
    host_id: str
    shm_ok: bool
    max_chunk_bytes: int
    pool: SharedPool
    def __init__(self, layout: _Optional[_Union[KVLayout, _Mapping]] = ..., host_id: _Optional[str] = ..., shm_ok: _Optional[bool] = ..., max_chunk_bytes: _Optional[int] = ..., pool: _Optional[_Union[SharedPool, _Mapping]] = ...) -> None: ...

class AttachShmRequest(_message.Message):
    __slots__ = ("sender_id", "segment_names", "segment_bytes")
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_NAMES_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    sender_id: str
    segment_names: _containers.RepeatedScalarFieldContainer[str]
    segment_bytes: int
    def __init__(self, sender_id: _Optional[str] = ..., segment_names: _Optional[_Iterable[str]] = ..., segment_bytes: _Optional[int] = ...) -> None: ...

class AttachShmResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DetachShmRequest(_message.Message):
    __slots__ = ("sender_id",)
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    sender_id: str
    def __init__(self, sender_id: _Optional[str] = ...) -> None: ...

class DetachShmResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "num_tokens", "num_blocks", "attempt", "one_sided", "sender_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ONE_SIDED_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_tokens: int
    num_blocks: int
    attempt: int
    one_sided: bool
    sender_id: str
    def __init__(self, request_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., num_blocks: _Optional[int] = ..., attempt: _Optional[int] = ..., one_sided: _Optional[bool] = ..., sender_id: _Optional[str] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("num_blocks", "block_ids", "slot", "ticket")
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    slot: int
    ticket: int
    def __init__(self, num_blocks: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ..., slot: _Optional[int] = ..., ticket: _Optional[int] = ...) -> None: ...

class ShmRef(_message.Message):
    __slots__ = ("segment_name", "offset")
    SEGMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    segment_name: str
    offset: int
    def __init__(self, segment_name: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class ChunkHeader(_message.Message):
    __slots__ = ("request_id", "attempt", "layer_start", "layer_end", "block_start", "block_end", "num_bytes", "shm", "crc32", "dst_rank")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    BLOCK_START_FIELD_NUMBER: _ClassVar[int]
    BLOCK_END_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    DST_RANK_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt: int
    layer_start: int
    layer_end: int
    block_start: int
    block_end: int
    num_bytes: int
    shm: ShmRef
    crc32: int
    dst_rank: int
    def __init__(self, request_id: _Optional[str] = ..., attempt: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., block_start: _Optional[int] = ..., block_end: _Optional[int] = ..., num_bytes: _Optional[int] = ..., shm: _Optional[_Union[ShmRef, _Mapping]] = ..., crc32: _Optional[int] = ..., dst_rank: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("header", "payload", "alignment")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    header: ChunkHeader
    payload: bytes
    alignment: bytes
    def __init__(self, header: _Optional[_Union[ChunkHeader, _Mapping]] = ..., payload: _Optional[bytes] = ..., alignment: _Optional[bytes] = ...) -> None: ...

class ChunkAck(_message.Message):
    __slots__ = ("num_bytes_written",)
    NUM_BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    num_bytes_written: int
    def __init__(self, num_bytes_written: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("request_id", "attempt", "first_token_id", "written")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt: int
    first_token_id: int
    written: _containers.RepeatedCompositeFieldContainer[WrittenRange]
    def __init__(self, request_id: _Optional[str] = ..., attempt: _Optional[int] = ..., first_token_id: _Optional[int] = ..., written: _Optional[_Iterable[_Union[WrittenRange, _Mapping]]] = ...) -> None: ...

class WrittenRange(_message.Message):
    __slots__ = ("layer_start", "layer_end", "block_start", "block_end")
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    BLOCK_START_FIELD_NUMBER: _ClassVar[int]
    BLOCK_END_FIELD_NUMBER: _ClassVar[int]
    layer_start: int
    layer_end: int
    block_start: int
    block_end: int
    def __init__(self, layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., block_start: _Optional[int] = ..., block_end: _Optional[int] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("num_bytes_received",)
    NUM_BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    num_bytes_received: int
    def __init__(self, num_bytes_received: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id", "reason", "writer_stopped", "ticket", "sender_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WRITER_STOPPED_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reason: str
    writer_stopped: bool
    ticket: int
    sender_id: str
    def __init__(self, request_id: _Optional[str] = ..., reason: _Optional[str] = ..., writer_stopped: _Optional[bool] = ..., ticket: _Optional[int] = ..., sender_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
