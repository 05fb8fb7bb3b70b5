"""The cluster a deployment is planned for, from a small YAML mapping (deploy/clusters/*.yaml):

    nodes: 64                        # machines
    devices_per_node: 8              # accelerators per machine (CPU cores on a CPU box)
    device_memory_gib: 80            # memory per device
    intra_node_bandwidth_gbps: 2400  # gigabits per second between two devices of one node (NVLink, shm)
    inter_node_bandwidth_gbps: 200   # gigabits per second per device between nodes (its NIC)
    # optional
    memory_utilization: 0.9          # share of device memory for weights + KV (the rest: activations)
    transfer_latency_ms: 0.0         # fixed cost of one KV transfer (handshake and commit round trips)
    device: gpu                      # gpu, or cpu (devices are cores: the plan runs on CPU, float32)
    name: 8xH100                     # how reports call it

Bandwidths are in gigabits per second (network convention: 8 Gb/s = 1 GB/s).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

_REQUIRED = ("nodes", "devices_per_node", "device_memory_gib", "intra_node_bandwidth_gbps",
             "inter_node_bandwidth_gbps")
_EXAMPLE = "see deploy/clusters/example.yaml"


@dataclass(frozen=True)
class ClusterSpec:
    nodes: int
    devices_per_node: int
    device_memory_gib: float
    intra_node_bandwidth_gbps: float
    inter_node_bandwidth_gbps: float
    memory_utilization: float = 0.9
    transfer_latency_ms: float = 0.0
    device: str = "gpu"
    name: str = "cluster"

    def __post_init__(self) -> None:
        for key in ("nodes", "devices_per_node"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"cluster: {key} must be a whole number of at least 1, got {value!r}")
        for key in ("device_memory_gib", "intra_node_bandwidth_gbps", "inter_node_bandwidth_gbps"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"cluster: {key} must be a positive number, got {value!r}")
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"cluster: memory_utilization must be in (0, 1], got {self.memory_utilization}")
        if self.device not in ("gpu", "cpu"):
            raise ValueError(f"cluster: device must be gpu or cpu, got {self.device!r}")
        if self.transfer_latency_ms < 0:
            raise ValueError(f"cluster: transfer_latency_ms must not be negative, got {self.transfer_latency_ms}")

    @classmethod
    def from_dict(cls, values: dict, where: str = "cluster") -> "ClusterSpec":
        if not isinstance(values, dict):
            raise ValueError(f"{where}: expected a mapping of cluster keys ({', '.join(_REQUIRED)}); {_EXAMPLE}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; known keys: "
                             f"{', '.join(sorted(known))}")
        missing = [k for k in _REQUIRED if k not in values]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}; {_EXAMPLE}")
        try:
            return cls(**values)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @property
    def num_devices(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def device_memory_bytes(self) -> int:
        return int(self.device_memory_gib * 1024**3)

    @property
    def intra_node_bytes_per_s(self) -> float:
        return self.intra_node_bandwidth_gbps * 1e9 / 8

    @property
    def inter_node_bytes_per_s(self) -> float:
        return self.inter_node_bandwidth_gbps * 1e9 / 8
