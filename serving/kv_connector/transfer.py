"""The transfer worker: carries out SendKV and RecvKV moves over kvcache.transfer (gRPC, and shared
memory between instances on one host: a decode instance's pool in shared memory, written by the
prefill instance itself).

An instance that sends (prefill) has `KVSends`; one that receives (decode) has `KVReceives` and serves
the KVTransfer service. Both are built from the instance's config; `make_worker(role, ...)` picks.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch

from kvcache.shared_pool import SharedKVPool
from kvcache.transfer import TransferConfig
from kvcache.transfer.layout import KVLayout
from scheduler.kv_moves import FAILED, CancelKV, KVMove, MoveResult, RecvKV, SendKV
from serving.config import Config
from serving.kv_connector.base import KVConnectorWorker, NullWorker
from serving.kv_connector.receives import KVReceives
from serving.kv_connector.sends import KVSends

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
    # the sender keeps no lease deadline of its own: the scheduler's RemoteDecode policy owns it
    return TransferConfig(rpc_timeout_s=deploy.kv_transfer_rpc_timeout_s,
                          stall_timeout_s=deploy.kv_transfer_stall_timeout_s,
                          max_retries=deploy.kv_transfer_max_retries, lease_ttl_s=None,
                          failure_policy=deploy.kv_transfer_failure_policy,
                          enable_shm=deploy.kv_transfer_enable_shm, checksum=deploy.kv_transfer_checksum)


class TransferWorker:
    """KVConnectorWorker for instances that send, receive, or both. token: the deployment's, which
    every KV call carries and the KVTransfer service requires (None: no check, for tests in one
    process)."""

    def __init__(self, config: Config, kv_caches: list[torch.Tensor], layout: KVLayout, send: bool, receive: bool,
                 host: str = "127.0.0.1", token: str | None = None, pool: SharedKVPool | None = None) -> None:
        """kv_caches: every tensor-parallel rank's cache, mapped into this process (rank r's at index r);
        layout: rank 0's. pool: the shared-memory pool a single rank's cache lives in, if any (a
        receiving worker then owns it)."""
        kv_caches = [kv_caches] if isinstance(kv_caches, torch.Tensor) else list(kv_caches)
        transfer = transfer_config(config)
        self.layout = layout
        self.sends = KVSends(transfer, token) if send else None
        self.receives = KVReceives(transfer, token) if receive else None
        self.address = ""  # of the KVTransfer service, when this worker receives
        self._results: list[MoveResult] = []
        if self.sends is not None:
            self.sends.bind(kv_caches, layout)
        if self.receives is not None:
            self.address = self.receives.start_server(kv_caches, layout, host, pool)
        elif pool is not None:
            pool.close()  # nobody will write into it from outside

    def start(self, moves: list[KVMove]) -> None:
        for move in moves:
            if isinstance(move, SendKV) and self.sends is not None:
                self.sends.begin(move)
            elif isinstance(move, RecvKV) and self.receives is not None:
                self.receives.expect(move.request_id, move.block_ids)
            elif isinstance(move, CancelKV):
                self._cancel(move)
            else:
                self._results.append(MoveResult(move.request_id, move.kind, FAILED,
                                                f"this instance does not carry out {move.kind} moves"))

    def _cancel(self, move: CancelKV) -> None:
        if self.sends is not None and self.sends.has(move.request_id):
            self.sends.cancel(move.request_id, move.reason)
        if self.receives is not None:
            self.receives.cancel(move.request_id, move.reason)  # returns once no receiver thread writes

    def wait_layers(self, layer_start: int, layer_end: int) -> None:
        pass  # its copies never touch what the forward pass computes next

    def layers_done(self, request_ids: list[str], layer_start: int, layer_end: int) -> None:
        if self.sends is not None:
            self.sends.layers_done(request_ids, layer_start, layer_end)

    def tokens_sampled(self, token_ids: dict[str, int]) -> None:
        if self.sends is not None:
            self.sends.tokens_sampled(token_ids)

    def poll(self) -> list[MoveResult]:
        results, self._results = self._results, []
        for side in (self.sends, self.receives):
            if side is not None:
                results += side.poll()
        return results

    def counters(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for side in (self.sends, self.receives):
            if side is not None:
                for name, value in side.counter_values().items():
                    values[name] = values.get(name, 0) + value
        return values

    def histograms(self) -> dict[str, dict]:
        """pdserve:kv_transfer_latency_seconds of this instance: begin -> acknowledgement of each
        transfer sent, Reserve -> Commit of each received."""
        side = self.sends if self.sends is not None else self.receives
        return {"kv_transfer_latency_seconds": side.counters.latency.snapshot()} if side is not None else {}

    def close(self) -> None:
        for side in (self.sends, self.receives):
            if side is not None:
                side.close()


ROLES = ("prefill", "decode", "colocated")


def make_worker(role: str, config: Config, kv_caches: list[torch.Tensor], layout: KVLayout,
                host: str = "127.0.0.1", token: str | None = None, pool: SharedKVPool | None = None
                ) -> KVConnectorWorker:
    """prefill: sends; decode: receives (and serves KVTransfer on host); colocated: moves nothing.
    kv_caches: every tensor-parallel rank's cache (rank r's at index r), layout: rank 0's. pool: the
    shared-memory pool a single rank's cache lives in (see wants_shared_pool); the worker owns it."""
    if role not in ROLES:
        raise ValueError(f"instance role must be one of {', '.join(ROLES)}, got {role!r}")
    if role == "colocated":
        if pool is not None:
            pool.close()
        return NullWorker()
    return TransferWorker(config, kv_caches, layout, send=role == "prefill", receive=role == "decode", host=host,
                          token=token, pool=pool)


def wants_shared_pool(role: str, config: Config, device) -> bool:
    """A decode instance of one rank keeps its KV pool where prefill instances of one rank on its host
    write into it themselves (one-sided): in shared memory, or on a GPU, opened by CUDA IPC
    (kvcache/cuda_ipc.py), with the control words in shared memory. Tensor-parallel instances use
    shared-memory slabs (each chunk then carries one rank's heads)."""
    return role == "decode" and config.deploy.kv_transfer_enable_shm and config.parallel.world_size == 1
