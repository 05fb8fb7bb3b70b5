"""The scheduler half of KV connectors: one policy object per placement mode, composed by the
Scheduler, so that no mode adds branches to `schedule()`.

    NullConnector        colocated: nothing moves
    RemotePrefill        decode instance: a request's prompt KV comes from a prefill instance
    RemoteDecode         prefill instance: a finished prompt's KV goes to a decode instance
    (shared pool)        semi-PD: decode adopts blocks the prefill worker wrote (AdoptKV)

The worker half (serving/) carries out the moves a policy puts in the plan.
"""
from scheduler.connectors.base import ConnectorPolicy, NullConnector
from scheduler.connectors.remote_decode import RemoteDecode
from scheduler.connectors.remote_prefill import RemotePrefill

__all__ = ["ConnectorPolicy", "NullConnector", "RemotePrefill", "RemoteDecode"]
