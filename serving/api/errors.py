"""OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, and the handlers that
make every failure (ours, FastAPI's, Starlette's) come out in it with the right status.

Client mistakes are 4xx with a message that says what to change; a failed engine is a 503 that says
what failed; anything unexpected is a 500 with a generic message (the details go to the log, never a
stack trace to the client).
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.engine.protocol import EngineDeadError, RequestRejectedError

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
    405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """A request that fails with `status`; the message is sent to the client as is."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        default_type = "server_error" if self.status >= 500 else "invalid_request_error"
        error_type = _TYPE_BY_STATUS.get(self.status, default_type)
        return {"error": {"message": self.message, "type": error_type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def internal_error(context: str) -> ApiError:
    """Log the exception being handled and return the generic 500 the client sees."""
    logger.exception("unexpected error in %s", context)
    return ApiError(500, "Internal server error; the details are in the server log.")


def to_api_error(exc: BaseException, context: str) -> ApiError:
    """Map an exception raised while serving a request to what the client sees."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestRejectedError):
        return ApiError(400, str(exc))
    if isinstance(exc, EngineDeadError):
        logger.error("engine unavailable in %s: %s", context, exc)
        return ApiError(503, engine_dead_message(exc))
    return internal_error(context)


_MAX_DEAD_MESSAGE_CHARS = 1000
_GENERIC_DEAD_MESSAGE = "The engine is unavailable; retry later."


def engine_dead_message(exc: EngineDeadError) -> str:
    """What the client is told when the engine (or the instance that held its request) failed.

    An EngineDeadError's message is written for the client (which instance failed, for which request,
    whether retrying can help); only its first line is sent, so a stack trace never is."""
    first_line = str(exc).strip().split("\n", 1)[0].strip()
    if not first_line or first_line.startswith("Traceback"):
        return _GENERIC_DEAD_MESSAGE
    if len(first_line) > _MAX_DEAD_MESSAGE_CHARS:
        first_line = first_line[:_MAX_DEAD_MESSAGE_CHARS] + "..."
    return first_line


def validation_error(exc: ValidationError | RequestValidationError) -> ApiError:
    """A 400 naming each invalid field, instead of FastAPI's default 422."""
    errors = exc.errors()
    parts = []
    for error in errors:
        loc = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {error.get('msg', 'invalid')}" if loc else str(error.get("msg")))
    first_loc = [str(p) for p in errors[0].get("loc", ()) if p != "body"] if errors else []
    return ApiError(400, "; ".join(parts) or "invalid request",
                    param=".".join(first_loc) or None)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # unknown routes (404), wrong methods (405), ...
        return ApiError(exc.status_code, str(exc.detail)).response()

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Last resort (e.g. a bug in a middleware); routes catch their own errors first.
        logger.error("unexpected error serving %s", request.url.path, exc_info=exc)
        return ApiError(500, "Internal server error; the details are in the server log.").response()

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
