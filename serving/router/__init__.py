"""The router: the disaggregated EngineClient in the API server. It launches the instances, picks a
prefill and a decode instance for each request, drives both (flow.py), detokenizes, and keeps the
instances healthy (pool.py). See docs/disaggregated.md."""
from serving.router.engine_client import DisaggregatedClient, build_disaggregated_client

__all__ = ["DisaggregatedClient", "build_disaggregated_client"]
