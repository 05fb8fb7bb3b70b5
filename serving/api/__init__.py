"""OpenAI-compatible HTTP API over an `EngineClient`."""
from serving.api.server import build_app, run_server

__all__ = ["build_app", "run_server"]
