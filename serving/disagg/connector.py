"""The KV connector of an instance, by role, on top of kvcache.transfer.

Every role implements the same interface (the runner's KVConnector plus the hooks InstanceCore
calls on the engine thread), so neither the runner nor the instance checks roles:

    prefill     sends each finished prompt's KV to the decode peer named in its KVSend, layer group
                by layer group while the forward pass computes the next ones (kv_sends.py)
    decode      serves KVTransfer and writes what arrives into the blocks the engine reserved
                (kv_receives.py)
    colocated   moves nothing
"""
from __future__ import annotations

import hashlib
import json
import os

import torch

from kvcache.transfer import TransferConfig
from kvcache.transfer.layout import KVLayout
from scheduler.step import KVSend
from serving.config import Config
from serving.disagg.kv_receives import KVReceives
from serving.disagg.kv_sends import KVSends
from serving.runner.connector import NullConnector, TransferEvents

_FINGERPRINT_SAMPLE_BYTES = 64 * 1024


def model_fingerprint(model_dir: str) -> str:
    """Identifies weights and architecture without reading whole checkpoints: config.json, and per
    weight file its name, size and its first and last 64 KiB."""
    digest = hashlib.sha256()
    with open(os.path.join(model_dir, "config.json"), "rb") as f:
        digest.update(json.dumps(json.load(f), sort_keys=True).encode())
    for name in sorted(os.listdir(model_dir)):
        if not name.endswith((".safetensors", ".bin", ".pt")):
            continue
        path = os.path.join(model_dir, name)
        size = os.path.getsize(path)
        digest.update(f"{name}:{size}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(_FINGERPRINT_SAMPLE_BYTES))
            f.seek(max(0, size - _FINGERPRINT_SAMPLE_BYTES))
            digest.update(f.read(_FINGERPRINT_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def transfer_config(config: Config) -> TransferConfig:
    deploy = config.deploy
    return TransferConfig(rpc_timeout_s=deploy.kv_transfer_rpc_timeout_s,
                          stall_timeout_s=deploy.kv_transfer_stall_timeout_s,
                          max_retries=deploy.kv_transfer_max_retries,
                          failure_policy=deploy.kv_transfer_failure_policy,
                          enable_shm=deploy.kv_transfer_enable_shm)


class ColocatedConnector(NullConnector):
    """Moves nothing; the hooks are no-ops. The base of the other roles.

    token: the deployment's; the prefill role sends it with every KV call, the decode role's KVTransfer
    service refuses calls without it (None: no check, for tests in one process).
    """

    def __init__(self, config: Config, token: str | None = None) -> None:
        self.config = config
        self.layout: KVLayout | None = None

    def bind(self, kv_cache: torch.Tensor, model_dir: str) -> None:
        self.layout = KVLayout.from_kv_cache(kv_cache, model_fingerprint(model_dir))

    def start_receiver(self, host: str) -> str:
        """Serve KVTransfer if this role receives; returns its address ("" if not)."""
        return ""

    def expect_recv(self, request_id: str, block_ids: list[int]) -> None:
        pass

    def first_token_arrived(self, request_id: str) -> None:
        pass

    def cancel_recvs(self, request_ids: list[str]) -> None:
        pass

    def take_failed_recvs(self) -> list[str]:
        return []

    def counters(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


class PrefillConnector(ColocatedConnector):
    def __init__(self, config: Config, token: str | None = None) -> None:
        super().__init__(config)
        self.layers_per_group = config.deploy.kv_transfer_layers_per_group
        self.sends = KVSends(transfer_config(config), token)

    def bind(self, kv_cache: torch.Tensor, model_dir: str) -> None:
        super().bind(kv_cache, model_dir)
        self.sends.bind(kv_cache, self.layout)

    def layer_groups(self, num_layers: int, num_tokens: int) -> list[tuple[int, int]]:
        step = self.layers_per_group
        return [(start, min(start + step, num_layers)) for start in range(0, num_layers, step)]

    def begin_sends(self, kv_cache: torch.Tensor, sends: list[KVSend]) -> None:
        self.sends.begin_sends(sends)

    def layers_done(self, layer_start: int, layer_end: int) -> None:
        self.sends.layers_done(layer_start, layer_end)

    def poll(self) -> TransferEvents:
        return self.sends.poll()

    def counters(self) -> dict[str, float]:
        return self.sends.counter_values()

    def close(self) -> None:
        self.sends.close()


class DecodeConnector(ColocatedConnector):
    def __init__(self, config: Config, token: str | None = None) -> None:
        super().__init__(config)
        self.receives = KVReceives(transfer_config(config), token=token)
        self._kv_cache: torch.Tensor | None = None

    def bind(self, kv_cache: torch.Tensor, model_dir: str) -> None:
        super().bind(kv_cache, model_dir)
        self._kv_cache = kv_cache

    def start_receiver(self, host: str) -> str:
        return self.receives.start(self._kv_cache, self.layout, host)

    def expect_recv(self, request_id: str, block_ids: list[int]) -> None:
        self.receives.expect(request_id, block_ids)

    def first_token_arrived(self, request_id: str) -> None:
        self.receives.first_token_arrived(request_id)

    def cancel_recvs(self, request_ids: list[str]) -> None:
        self.receives.cancel(request_ids)

    def take_failed_recvs(self) -> list[str]:
        return self.receives.take_failed()

    def poll(self) -> TransferEvents:
        return self.receives.poll()

    def counters(self) -> dict[str, float]:
        return self.receives.counter_values()

    def close(self) -> None:
        self.receives.close()


InstanceConnector = ColocatedConnector  # the interface every role implements
_CONNECTORS = {"prefill": PrefillConnector, "decode": DecodeConnector, "colocated": ColocatedConnector}


def make_connector(role: str, config: Config, token: str | None = None) -> InstanceConnector:
    return _CONNECTORS[role](config, token)
