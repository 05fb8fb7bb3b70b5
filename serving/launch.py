"""Builds the EngineClient that the HTTP server talks to, by placement mode."""
from __future__ import annotations

from serving.config import Config
from serving.engine.protocol import EngineClient


def build_engine_client(config: Config) -> EngineClient:
    if config.deploy.mode == "colocated":
        from serving.engine.async_llm import AsyncLLM
        return AsyncLLM.from_config(config)
    from serving.disagg.router import build_disaggregated_client
    return build_disaggregated_client(config)
