"""The seam between the model runner and KV transfer.

The runner tells its connector which KV to send when a step starts, hands it each layer group as
the forward pass finishes it (so sending overlaps the layers still to compute), and polls it for
transfers that ended. Colocated instances use NullConnector, which does nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from scheduler.step import KVSend


@dataclass
class TransferEvents:
    finished_sending: list[str] = field(default_factory=list)
    failed_sending: list[str] = field(default_factory=list)
    finished_recving: list[str] = field(default_factory=list)
    failed_recving: list[str] = field(default_factory=list)


class KVConnector(Protocol):
    def layer_groups(self, num_layers: int, num_tokens: int) -> list[tuple[int, int]]:
        """How to split the forward pass when this step sends KV: [(start, end), ...]."""

    def begin_sends(self, kv_cache: Tensor, sends: list[KVSend]) -> None:
        """Start the transfers of this step (the peers reserve blocks). Must not block on the wire."""

    def layers_done(self, layer_start: int, layer_end: int) -> None:
        """Layers [start, end) of this step's sends are in the cache: ship them (asynchronously)."""

    def poll(self) -> TransferEvents:
        """Transfers that completed or failed for good since the last poll (never blocks)."""


class NullConnector:
    def layer_groups(self, num_layers: int, num_tokens: int) -> list[tuple[int, int]]:
        return [(0, num_layers)]

    def begin_sends(self, kv_cache: Tensor, sends: list[KVSend]) -> None:
        if sends:
            raise RuntimeError("this instance has no KV transfer connector but was asked to send KV")

    def layers_done(self, layer_start: int, layer_end: int) -> None:
        pass

    def poll(self) -> TransferEvents:
        return TransferEvents()
