"""Where instances go: nodes for each instance, and whether prefill and decode must share a node.

DistServe's two placements:

    anywhere    (cross-node bandwidth high) instances are packed onto nodes first-fit in order
                (prefill instances, then decode instances); a KV transfer between two nodes uses the
                inter-node bandwidth, and the simulator charges it
    same node   (cross-node bandwidth low) each unit's prefill and decode instances share a node, one
                node per pipeline stage (segment i of every instance of the unit on node i of the
                unit), so KV moves only within a node: both phases need the same pp, and a unit's
                instances must fit in one node's devices

The planner picks `same node` when moving the KV of a mean prompt across nodes would take more than
`transfer_share` (default 10%) of the time to prefill it (`choose_placement`).
"""
from __future__ import annotations

from dataclasses import dataclass

from scheduler.planner.cluster import ClusterSpec

ANYWHERE, SAME_NODE = "anywhere", "same node"


@dataclass(frozen=True)
class PlacementChoice:
    placement: str
    transfer_s: float  # a mean prompt's KV over one inter-node link
    prefill_s: float  # prefilling that prompt on one device
    reason: str


def choose_placement(cluster: ClusterSpec, mean_prompt_tokens: float, kv_bytes_per_token: int,
                     prefill_s: float, transfer_share: float = 0.1) -> PlacementChoice:
    transfer_s = mean_prompt_tokens * kv_bytes_per_token / cluster.inter_node_bytes_per_s
    if cluster.nodes == 1:
        return PlacementChoice(ANYWHERE, transfer_s, prefill_s, "one node: every transfer stays within it")
    if transfer_s <= transfer_share * prefill_s:
        return PlacementChoice(ANYWHERE, transfer_s, prefill_s,
                               f"cross-node bandwidth is high: a mean prompt's KV crosses nodes in "
                               f"{1e3 * transfer_s:.2f} ms, <= {100 * transfer_share:g}% of its prefill "
                               f"({1e3 * prefill_s:.1f} ms)")
    return PlacementChoice(SAME_NODE, transfer_s, prefill_s,
                           f"cross-node bandwidth is low: a mean prompt's KV would take {1e3 * transfer_s:.2f} ms "
                           f"across nodes, > {100 * transfer_share:g}% of its prefill ({1e3 * prefill_s:.1f} ms); "
                           "prefill and decode of a unit share a node")


def pack_first_fit(device_counts: list[int], cluster: ClusterSpec) -> list[int]:
    """The first node of each instance, packing in order; an instance wider than a node takes whole
    nodes of its own. Raises ValueError when the cluster is too small."""
    free = [cluster.devices_per_node] * cluster.nodes
    nodes = []
    for count in device_counts:
        node = _fit(free, count, cluster.devices_per_node)
        if node is None:
            raise ValueError(f"the deployment needs {sum(device_counts)} devices in instances of "
                             f"{sorted(set(device_counts))} devices; the cluster has {cluster.nodes} node(s) of "
                             f"{cluster.devices_per_node}: use fewer instances or a bigger cluster")
        nodes.append(node)
    return nodes


def _fit(free: list[int], count: int, per_node: int) -> int | None:
    if count <= per_node:
        for node, left in enumerate(free):
            if left >= count:
                free[node] -= count
                return node
        return None
    span = -(-count // per_node)
    for node in range(len(free) - span + 1):
        if all(left == per_node for left in free[node:node + span]):
            for i in range(node, node + span):
                free[i] = 0
            return node
    return None
