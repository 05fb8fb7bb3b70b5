"""The worker half of KV connectors (the scheduler half is scheduler/connectors)."""
from serving.kv_connector.base import KVConnectorWorker, NullWorker

__all__ = ["KVConnectorWorker", "NullWorker"]
