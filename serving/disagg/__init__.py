"""Disaggregated prefill/decode serving: instances (an engine in a role behind gRPC), the KV connector
that moves prompt KV from prefill to decode instances, the router that drives both for each request,
and the launchers (local subprocesses, Ray actors). See docs/disaggregated.md."""
