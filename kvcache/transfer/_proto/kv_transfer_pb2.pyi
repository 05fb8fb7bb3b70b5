from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVLayout(_message.Message):
    __slots__ = ("model_fingerprint", "dtype", "block_size", "num_layers", "num_kv_heads", "head_dim", "tp_size", "tp_rank")
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tp_size: int
    tp_rank: int
    def __init__(self, model_fingerprint: _Optional[str] = ..., dtype: _Optional[str] = ..., block_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., tp_size: _Optional[int] = ..., tp_rank: _Optional[int] = ...) -> None: ...

class HandshakeRequest(_message.Message):
    __slots__ = ("layout", "host_id", "sender_id", "want_shm")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    WANT_SHM_FIELD_NUMBER: _ClassVar[int]
    layout: KVLayout
    host_id: str
    sender_id: str
    want_shm: bool
    def __init__(self, layout: _Optional[_Union[KVLayout, _Mapping]] = ..., host_id: _Optional[str] = ..., sender_id: _Optional[str] = ..., want_shm: _Optional[bool] = ...) -> None: ...

class HandshakeResponse(_message.Message):
    __slots__ = ("layout", "host_id", "shm_ok", "max_chunk_bytes")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    SHM_OK_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    layout: KVLayout
    host_id: str
    shm_ok: bool
    max_chunk_bytes: int
    def __init__(self, layout: _Optional[_Union[KVLayout, _Mapping]] = ..., host_id: _Optional[str] = ..., shm_ok: _Optional[bool] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("request_id", "num_tokens", "num_blocks", "attempt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_tokens: int
    num_blocks: int
    attempt: int
    def __init__(self, request_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., num_blocks: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("num_blocks",)
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    def __init__(self, num_blocks: _Optional[int] = ...) -> None: ...

class ShmRef(_message.Message):
    __slots__ = ("segment_name", "offset")
    SEGMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    segment_name: str
    offset: int
    def __init__(self, segment_name: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class ChunkHeader(_message.Message):
    __slots__ = ("request_id", "attempt", "layer_start", "layer_end", "block_start", "block_end", "num_bytes", "shm", "crc32")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    BLOCK_START_FIELD_NUMBER: _ClassVar[int]
    BLOCK_END_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt: int
    layer_start: int
    layer_end: int
    block_start: int
    block_end: int
    num_bytes: int
    shm: ShmRef
    crc32: int
    def __init__(self, request_id: _Optional[str] = ..., attempt: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., block_start: _Optional[int] = ..., block_end: _Optional[int] = ..., num_bytes: _Optional[int] = ..., shm: _Optional[_Union[ShmRef, _Mapping]] = ..., crc32: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("request_id", "attempt", "first_token_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt: int
    first_token_id: int
    def __init__(self, request_id: _Optional[str] = ..., attempt: _Optional[int] = ..., first_token_id: _Optional[int] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("num_bytes_received",)
    NUM_BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    num_bytes_received: int
    def __init__(self, num_bytes_received: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
