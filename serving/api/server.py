"""The OpenAI-compatible HTTP server: `build_app` (routes, middleware, error handlers) and
`run_server` (uvicorn until cancelled or signalled, then `engine.shutdown()`).

Routes:
    POST /v1/completions, POST /v1/chat/completions   (API key, if configured)
    GET  /v1/models, /v1/models/{model}                (API key, if configured)
    GET  /health (200 healthy / 503), /metrics (Prometheus), /version   (always open)
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import signal
import threading

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from serving.api.endpoints import GenerationEndpoints
from serving.api.errors import ApiError, install_error_handlers, to_api_error
from serving.api.middleware import ApiKeyAuth, BodySizeLimit
from serving.api.responder import CLIENT_CLOSED
from serving.config import ServerConfig
from serving.engine.protocol import EngineClient, EngineDeadError, ModelInfo
from serving.metrics import ServingMetrics

logger = logging.getLogger(__name__)

# seconds uvicorn lets in-flight requests finish on shutdown before cancelling them (which aborts
# them in the engine); long enough for a short completion, short enough for an operator's Ctrl-C
_GRACEFUL_SHUTDOWN_S = 10


def _version() -> str:
    try:
        return importlib.metadata.version("pdserve")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


class _OpenAIRoute(APIRoute):
    """Routes whose errors come out in OpenAI's shape: `ApiError`s as they are, engine errors
    mapped to their status, anything else a logged 500 with a generic message."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (StarletteHTTPException, RequestValidationError):
                raise  # shaped by the app's exception handlers
            except ClientDisconnect:  # gone while sending its body: nobody to answer
                return Response(status_code=CLIENT_CLOSED)
            except Exception as exc:
                return to_api_error(exc, request.url.path).response()

        return guarded


def _model_card(info: ModelInfo) -> dict:
    return {"id": info.name, "object": "model", "created": info.created, "owned_by": "pdserve",
            "root": info.path, "parent": None, "max_model_len": info.max_model_len}


def build_app(engine: EngineClient, server_config: ServerConfig) -> FastAPI:
    """A FastAPI app serving `engine`. It owns its metrics (`app.state.metrics`); it does not own
    the engine (whoever built the engine shuts it down; `run_server` does)."""
    info = engine.model_info
    metrics = ServingMetrics(info.name, info.max_model_len)
    endpoints = GenerationEndpoints(engine, metrics)
    app = FastAPI(title="pdserve", version=_version(), docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.router.route_class = _OpenAIRoute
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=server_config.max_request_bytes)
    # added last, so outermost: the body of an unauthenticated request is never read
    app.add_middleware(ApiKeyAuth, api_key=server_config.api_key)

    app.add_api_route("/v1/completions", endpoints.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", endpoints.chat_completions, methods=["POST"])

    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [_model_card(engine.model_info)]})

    async def get_model(model: str) -> JSONResponse:
        if model not in (engine.model_info.name, engine.model_info.path):
            raise ApiError(404, f"The model `{model}` does not exist.", param="model",
                           code="model_not_found")
        return JSONResponse(_model_card(engine.model_info))

    async def health() -> Response:
        if engine.is_healthy():
            return Response(status_code=200)
        return ApiError(503, "The engine is not healthy.").response()

    async def prometheus_metrics() -> Response:
        try:
            await engine.refresh_stats()  # a scrape reflects every request finished before it
            metrics.observe_engine_stats(engine.get_stats())
        except EngineDeadError:
            pass  # still export what the API layer measured
        return Response(metrics.render(), media_type=metrics.content_type)

    async def version() -> JSONResponse:
        return JSONResponse({"version": _version()})

    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", get_model, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", prometheus_metrics, methods=["GET"])
    app.add_api_route("/version", version, methods=["GET"])
    return app


class _Server(uvicorn.Server):
    """uvicorn re-raises a caught SIGINT/SIGTERM once it has stopped, which would end the process
    before the engine is shut down; here a signal only asks for a graceful exit (a second SIGINT
    forces it), and `run_server` returns normally."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # signals can only be handled in the main thread
            return
        originals = {sig: signal.signal(sig, self.handle_exit)
                     for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


async def run_server(engine: EngineClient, server_config: ServerConfig) -> None:
    """Serve until SIGINT/SIGTERM or cancellation, then stop uvicorn gracefully and shut the
    engine down (always, even if uvicorn fails to start)."""
    app = build_app(engine, server_config)
    config = uvicorn.Config(app, host=server_config.host, port=server_config.port,
                            log_level=server_config.log_level,
                            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S)
    server = _Server(config)
    try:
        await server.serve()
    except asyncio.CancelledError:
        # cancelled mid-serve: uvicorn's own shutdown did not run; close the sockets and let
        # in-flight requests finish (or be cancelled, which aborts them) before the engine goes
        if server.started:
            server.should_exit = True
            await server.shutdown()
        raise
    finally:
        await engine.shutdown()
