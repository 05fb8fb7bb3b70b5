"""The OpenAI-compatible HTTP server: `build_app` (routes, middleware, error handlers) and
`run_server` (uvicorn until cancelled or signalled, then `engine.shutdown()`).

Routes:
    POST /v1/completions, POST /v1/chat/completions   (API key, if configured)
    GET  /v1/models, /v1/models/{model}                (API key, if configured)
    GET  /health (200 healthy / 503), /metrics (Prometheus), /version   (always open)

Shutdown (SIGTERM, or a first SIGINT), the drain (see drain.py):
    1. stop listening (new connections are refused); new requests on open connections get a 503,
       /health too
    2. wait until no request is in flight, at most --shutdown-timeout
    3. end the requests still running: their engine requests are aborted; a stream gets an error
       event and `data: [DONE]`, a response not yet started a 503
    4. wait for them to go out (at most _END_GRACE_S), then uvicorn closes the connections
    5. engine.shutdown() (disaggregated: the instances are stopped, and drain what is left)
A second signal skips what is left of 2 and 4. The process exits 0 either way.
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

from serving.api.connection import with_header_deadline
from serving.api.drain import Drain, DrainGate
from serving.api.endpoints import GenerationEndpoints
from serving.api.errors import ApiError, install_error_handlers, to_api_error
from serving.api.middleware import ApiKeyAuth, BodyDeadline, BodySizeLimit
from serving.api.responder import CLIENT_CLOSED
from serving.config import ServerConfig
from serving.engine.protocol import EngineClient, EngineDeadError, ModelInfo
from serving.metrics import ServingMetrics

logger = logging.getLogger(__name__)

# after the drain: how long requests ended with the shutdown error have to send it (a client that
# does not read blocks that), and uvicorn's own graceful window before it cancels what is left
_END_GRACE_S = 5


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
    """A FastAPI app serving `engine`. It owns its metrics (`app.state.metrics`) and its shutdown
    state (`app.state.drain`, driven by `run_server`); it does not own the engine (whoever built the
    engine shuts it down; `run_server` does)."""
    info = engine.model_info
    metrics = ServingMetrics(info.name, info.max_model_len)
    drain = Drain()
    endpoints = GenerationEndpoints(engine, metrics, drain)
    app = FastAPI(title="pdserve", version=_version(), docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.router.route_class = _OpenAIRoute
    app.state.metrics = metrics
    app.state.drain = drain
    install_error_handlers(app)
    # each add_middleware wraps the ones before: the last added runs first
    app.add_middleware(BodyDeadline, timeout_s=server_config.request_body_timeout_s)
    app.add_middleware(BodySizeLimit, max_bytes=server_config.max_request_bytes)
    # the body of an unauthenticated request is never read
    app.add_middleware(ApiKeyAuth, api_key=server_config.api_key)
    # outermost: every request is counted, and none is let in once the server is draining
    app.add_middleware(DrainGate, drain=drain)

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
    """uvicorn that drains on SIGINT/SIGTERM (the steps are in this module's docstring).

    uvicorn's own handling would stop at once, give running requests a fixed window and then cut
    them mid-body, and re-raise the signal before the engine is shut down. Here the signal handler
    (installed by `run_server` for its whole run) only counts signals; `on_tick`, which uvicorn
    calls every 0.1 s on the event loop, starts the drain, and the drain sets `should_exit` when it
    is done, which runs uvicorn's shutdown (it then finds nothing left to wait for).
    """

    def __init__(self, config: uvicorn.Config, drain: Drain, shutdown_timeout_s: float) -> None:
        super().__init__(config)
        self._drain = drain
        self._shutdown_timeout_s = shutdown_timeout_s
        self._num_signals = 0
        self._draining: asyncio.Task | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        yield  # run_server holds the signals (uvicorn's would re-raise them once it has stopped)

    def handle_exit(self, sig: int, frame) -> None:
        # a signal handler interrupts the loop anywhere: count only, on_tick acts
        self._num_signals += 1

    def _forced(self) -> bool:
        return self._num_signals >= 2

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets)
        if self.force_exit:  # uvicorn skips the app's lifespan shutdown then; its task would be cancelled
            await self.lifespan.shutdown()  # at the loop's end and logged as an ERROR traceback

    async def on_tick(self, counter: int) -> bool:
        if self._num_signals:
            self.drain()
        return await super().on_tick(counter)

    def drain(self) -> asyncio.Task:
        """Start the drain (once); the task ends with `should_exit` set."""
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain_requests(), name="pdserve-drain")
        return self._draining

    async def _drain_requests(self) -> None:
        drain = self._drain
        for server in self.servers:
            server.close()  # stop listening: new connections are refused
        drain.begin()
        logger.info("shutting down: no new requests; waiting up to %gs for %d request(s) in flight "
                    "(--shutdown-timeout; a second signal ends them now)", self._shutdown_timeout_s,
                    drain.num_in_flight)
        if not await drain.wait_idle(self._shutdown_timeout_s, self._forced):
            num_ended = drain.expire()
            logger.warning("shutting down: ending %d generation(s) still running with a 503 "
                           "(%d request(s) in flight)", num_ended, drain.num_in_flight)
            if not await drain.wait_idle(_END_GRACE_S, lambda: False):
                logger.warning("shutting down: %d request(s) did not end; closing their connections",
                               drain.num_in_flight)
        self.force_exit = self._forced()
        self.should_exit = True


@contextlib.contextmanager
def _signals_to(handler):
    """SIGINT and SIGTERM go to handler(sig, frame) inside the block (main thread only: elsewhere
    signals cannot be handled, and the embedding program owns them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    originals = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, original in originals.items():
            signal.signal(sig, original)


async def run_server(engine: EngineClient, server_config: ServerConfig) -> None:
    """Serve until SIGINT/SIGTERM or cancellation, then drain (see the module docstring) and shut
    the engine down (always, even if uvicorn fails to start). Signals during the engine's shutdown
    are ignored: it is bounded."""
    app = build_app(engine, server_config)
    config = uvicorn.Config(app, host=server_config.host, port=server_config.port,
                            log_level=server_config.log_level,
                            http=with_header_deadline(server_config.request_header_timeout_s),
                            timeout_graceful_shutdown=_END_GRACE_S)
    server = _Server(config, app.state.drain, server_config.shutdown_timeout_s)
    with _signals_to(server.handle_exit):
        try:
            await server.serve()
        except asyncio.CancelledError:
            # cancelled mid-serve: drain as on a signal, then uvicorn's shutdown, which did not run
            if server.started:
                await server.drain()
                await server.shutdown()
            raise
        finally:
            await engine.shutdown()
