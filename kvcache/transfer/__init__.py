"""KV-cache transfer between prefill and decode instances over gRPC (disaggregated serving).

Decode side: `KVReceiver` (writes received chunks into its kv_cache, asks a `BlockAllocator` for
blocks) served by `ReceiverServer`. Prefill side: `KVSender.connect()`, then per request
`begin()` -> `TransferHandle.send_layers()` as layers finish -> `finish()` or `poll()`.
See docs/kv_transfer.md.
"""
from kvcache.transfer.config import TransferConfig
from kvcache.transfer.counters import TransferCounters
from kvcache.transfer.handle import TransferHandle, TransferResult, TransferState
from kvcache.transfer.layout import IncompatibleLayoutError, KVLayout
from kvcache.transfer.receiver import BlockAllocator, KVReceiver
from kvcache.transfer.peer import PeerUnavailableError, TransferRefusedError
from kvcache.transfer.sender import KVSender
from kvcache.transfer.server import ReceiverServer

__all__ = ["BlockAllocator", "IncompatibleLayoutError", "KVLayout", "KVReceiver", "KVSender",
           "PeerUnavailableError", "ReceiverServer", "TransferConfig", "TransferCounters", "TransferHandle",
           "TransferRefusedError", "TransferResult", "TransferState"]
