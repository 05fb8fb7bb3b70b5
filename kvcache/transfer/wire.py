"""The bytes on the wire: method paths, gRPC options and the zero-copy KVChunk framing.

A PushChunk message is the protobuf encoding of `KVChunk{header, payload}` written by hand, header
first, so that neither side runs the payload through protobuf (which would copy it twice):

    0x0A varint(len(h)) h   0x1A varint(p) 0…0   0x12 varint(n) payload[n]
    └─ field 1: header ─┘   └─ 3: alignment ─┘   └──── field 2: payload ───┘
    |<------------- prefix, a multiple of 64 bytes ------------->|

The sender allocates the whole message once and packs the KV straight into its tail; the receiver
views the payload in place, as an array of the KV dtype (hence the alignment). Any protobuf decoder
still reads it as a normal KVChunk.
"""
from __future__ import annotations

import ctypes
import warnings
import zlib

import torch

from kvcache.transfer._proto import kv_transfer_pb2 as pb
from kvcache.transfer.config import TransferConfig

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVTransfer"].full_name  # "pdserve.kv.KVTransfer"
# Trailing metadata of a refused handshake: the receiver's KVLayout, so that the sender can name
# the differing fields from its own point of view.
LAYOUT_TRAILER_KEY = "pdserve-kv-layout-bin"

_HEADER_TAG = 0x0A   # field 1, wire type 2 (length-delimited)
_PAYLOAD_TAG = 0x12  # field 2, wire type 2
_ALIGNMENT_TAG = 0x1A  # field 3, wire type 2
_PREFIX_ALIGNMENT = 64  # a bytes object's data is 16-byte aligned, so the payload is too

# torch.frombuffer warns once per process on read-only buffers such as bytes. Here that is
# intended: a received payload is only read, and an outgoing message is written only before gRPC
# sees it. Spend the one warning now, silenced, so that it never reaches the logs.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.frombuffer(b"\0", dtype=torch.uint8)

# PyBytes_FromStringAndSize(NULL, n) returns an uninitialised bytes object that its creator may fill
# before sharing it (the documented C idiom). gRPC only accepts `bytes`, so this lets pack_kv write
# the payload directly into the object that gRPC sends, saving a full copy of every chunk.
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)


def method_path(name: str) -> str:
    return f"/{SERVICE_NAME}/{name}"


def grpc_options(config: TransferConfig) -> list[tuple[str, int]]:
    """Channel and server options: chunk-sized messages, no per-call size surprises."""
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # Read large socket chunks so that a message arrives in few slices (fewer copies to join).
        ("grpc.experimental.tcp_min_read_chunk_size", 256 * 1024),
        ("grpc.experimental.tcp_max_read_chunk_size", config.max_message_bytes),
    ]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low7 = value & 0x7F
        value >>= 7
        if value:
            out.append(low7 | 0x80)
        else:
            out.append(low7)
            return bytes(out)


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or malformed varint in KVChunk")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def new_chunk_message(header: pb.ChunkHeader) -> tuple[bytes, torch.Tensor]:
    """An encoded KVChunk with header.num_bytes payload bytes left to fill.

    Returns (message, payload) where payload [header.num_bytes] uint8 aliases the message's tail.
    Fill the payload completely before handing the message to gRPC, and never after.
    """
    header_bytes = header.SerializeToString()
    prefix = bytes([_HEADER_TAG]) + _varint(len(header_bytes)) + header_bytes
    if header.num_bytes:
        prefix = _aligned_prefix(prefix, bytes([_PAYLOAD_TAG]) + _varint(header.num_bytes))
    message = _new_bytes(None, len(prefix) + header.num_bytes)
    view = torch.frombuffer(message, dtype=torch.uint8)                 # [len(message)], aliases it
    view[:len(prefix)] = torch.frombuffer(prefix, dtype=torch.uint8)
    return message, view[len(prefix):]


def _aligned_prefix(head: bytes, payload_tag: bytes) -> bytes:
    """head + an alignment field + payload_tag, padded to a multiple of _PREFIX_ALIGNMENT."""
    for num_pad in range(_PREFIX_ALIGNMENT, 2 * _PREFIX_ALIGNMENT):
        pad_field = bytes([_ALIGNMENT_TAG]) + _varint(num_pad) + bytes(num_pad)
        if (len(head) + len(pad_field) + len(payload_tag)) % _PREFIX_ALIGNMENT == 0:
            return head + pad_field + payload_tag
    raise AssertionError("unreachable: 64 consecutive pad lengths cover every residue")


def rewrite_header(message: bytes, header: pb.ChunkHeader) -> None:
    """Write `header` over the header of a message made by new_chunk_message, in place. Only fields of
    fixed size may have changed (the CRC-32 of the payload, known once the payload is filled)."""
    header_bytes = header.SerializeToString()
    view = torch.frombuffer(message, dtype=torch.uint8)
    old_len, pos = _read_varint(memoryview(message), 1)
    if old_len != len(header_bytes):
        raise ValueError("rewrite_header() may only change fixed-size header fields")
    view[pos:pos + old_len] = torch.frombuffer(header_bytes, dtype=torch.uint8)


def payload_crc32(payload: torch.Tensor) -> int:
    """CRC-32 (zlib's) of a contiguous tensor's bytes."""
    return zlib.crc32(payload.contiguous().view(torch.uint8).numpy())


def encode_control_chunk(header: pb.ChunkHeader) -> bytes:
    """A KVChunk without inline payload (shared-memory chunks)."""
    return pb.KVChunk(header=header).SerializeToString()


def parse_chunk(message: bytes) -> tuple[pb.ChunkHeader, memoryview]:
    """(header, payload) of an encoded KVChunk; the payload is a view into message, not a copy.

    Messages in the header-first order above take the in-place path; anything else (another
    implementation's field order) is decoded by protobuf, which copies.
    """
    data = memoryview(message)
    if len(data) and data[0] == _HEADER_TAG:
        header_len, pos = _read_varint(data, 1)
        header = pb.ChunkHeader.FromString(data[pos:pos + header_len])
        pos += header_len
        if pos == len(data):
            return header, data[pos:]
        if data[pos] == _ALIGNMENT_TAG:
            pad_len, pos = _read_varint(data, pos + 1)
            pos += pad_len
        if pos < len(data) and data[pos] == _PAYLOAD_TAG:
            payload_len, pos = _read_varint(data, pos + 1)
            if pos + payload_len == len(data):
                return header, data[pos:]
    chunk = pb.KVChunk.FromString(message)
    return chunk.header, memoryview(chunk.payload)


def view_payload(payload: memoryview, dtype: torch.dtype) -> torch.Tensor:
    """A flat dtype tensor over a received payload, in place when aligned (copied otherwise)."""
    if len(payload) % dtype.itemsize:
        raise ValueError(f"payload of {len(payload)} bytes is not a whole number of {dtype} elements")
    if len(payload) == 0:
        return torch.empty(0, dtype=dtype)
    flat = torch.frombuffer(payload, dtype=torch.uint8)                    # [num_bytes]
    if flat.data_ptr() % dtype.itemsize:
        flat = flat.clone()
    return flat.view(dtype)


def identity(data: bytes) -> bytes:
    """(De)serializer for raw-bytes methods: gRPC hands the bytes through untouched."""
    return data
