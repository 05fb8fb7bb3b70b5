"""Configuration of the KV transfer layer (one frozen dataclass, validated on construction)."""
from __future__ import annotations

from dataclasses import dataclass

FAILURE_POLICIES = ("recompute", "fail")


@dataclass(frozen=True)
class TransferConfig:
    # Payload bytes per PushChunk message. Larger chunks cost fewer RPCs; smaller ones start the
    # receiver's copy sooner. A layer group bigger than this is split by layers, then by blocks.
    # 2 MiB measured best on loopback (bench/kv_transfer.py): larger messages cost page faults in
    # gRPC's and the allocator's buffers, smaller ones more RPCs.
    max_chunk_bytes: int = 2 * 1024**2
    # TCP connections to one peer; each one's HTTP/2 framing runs on its own gRPC thread.
    num_channels: int = 2
    # Chunks in flight per sender (packing or on the wire at once).
    num_streams: int = 4
    # Deadline of every single RPC; no call waits without one.
    rpc_timeout_s: float = 10.0
    # The prefill side holds a request's KV at most this long without an acknowledgement. None: the
    # sender never expires a lease itself (an engine that owns the blocks keeps the deadline).
    lease_ttl_s: float | None = 60.0
    # The decode side drops a reserved transfer that made no progress for this long.
    stall_timeout_s: float = 30.0
    # Whole-transfer retries after a failure before `failure_policy` applies.
    max_retries: int = 1
    # What the engine should do with a request whose transfer failed: recompute its prompt on the
    # decode side, or fail it.
    failure_policy: str = "recompute"
    # Same-host peers move payloads through shared memory (gRPC carries only the handle).
    enable_shm: bool = True
    # Shared-memory slabs per sender, each max_chunk_bytes long: shm chunks in flight at once.
    num_shm_slabs: int = 4
    # Same host and enable_shm, and the decode side's pool in shared memory: the sender writes the
    # reserved blocks into it itself (one-sided); the slabs above are then the fallback only.
    one_sided: bool = True
    # The sender puts a CRC-32 of each chunk's payload in its header; the receiver verifies it before
    # writing and refuses a mismatch (the transfer is retried, then fails by policy: never wrong KV).
    checksum: bool = False

    def __post_init__(self) -> None:
        if self.max_chunk_bytes < 4096:
            raise ValueError(f"--kv-transfer-max-chunk-bytes must be at least 4096, got {self.max_chunk_bytes}")
        if self.max_chunk_bytes > 1024**3:
            raise ValueError("--kv-transfer-max-chunk-bytes must be at most 1GiB (gRPC message limit: "
                             f"2GiB), got {self.max_chunk_bytes}")
        if self.num_channels < 1 or self.num_streams < 1:
            raise ValueError("--kv-transfer-num-channels and --kv-transfer-num-streams must be at least 1")
        for name in ("rpc_timeout_s", "lease_ttl_s", "stall_timeout_s"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--kv-transfer-{name.replace('_', '-')} must be positive, got "
                                 f"{getattr(self, name)}")
        if not 0 <= self.max_retries <= 3:
            raise ValueError(f"--kv-transfer-max-retries must be in [0, 3], got {self.max_retries}")
        if self.failure_policy not in FAILURE_POLICIES:
            raise ValueError(f"--kv-transfer-failure-policy must be one of {', '.join(FAILURE_POLICIES)}, "
                             f"got {self.failure_policy!r}")
        if self.num_shm_slabs < 1:
            raise ValueError(f"--kv-transfer-num-shm-slabs must be at least 1, got {self.num_shm_slabs}")

    @property
    def max_message_bytes(self) -> int:
        """gRPC message size limit: one chunk's payload plus room for its header."""
        return self.max_chunk_bytes + 64 * 1024
