"""Errors and the HTTP guards in front of the routes: OpenAI error bodies, API key, body size.

Every failure leaves the server as `{"error": {message, type, param, code}}` with its status, and
the engine's own errors map to HTTP here and nowhere else.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nanoinfer.engine.async_engine import RequestFailedError
from nanoinfer.errors import EngineDeadError, EngineOverloadedError, NanoInferError, RequestError
from nanoinfer.server.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("nanoinfer.server")

# Paths that answer without an API key: load balancers and Prometheus scrapers carry none, and the
# playground's page and files must load before it can ask the person for the key. They hold no data.
OPEN_PATHS = {"/health", "/metrics", "/"}
OPEN_PREFIXES = ("/static/",)  # the playground's files (only the package's static folder is served there)
RETRY_AFTER_SECONDS = 1  # what a 503 for a full queue suggests


# What every API route may answer besides its 200, for the OpenAPI schema: OpenAI error bodies with
# 400 (bad input), 401 (API key), 404 (model), 405, 408 (timeout), 413 (body size), and 503
# (loading, draining, dead engine, full queue).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "The request cannot be served as sent"},
    503: {"model": ErrorResponse, "description": "Not serving now (loading, shutting down, busy: see Retry-After)"},
}


class APIError(Exception):
    """An error with its HTTP status, rendered as {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_response(
    status: int,
    message: str,
    type: str,
    param: str | None = None,
    code: str | int | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The JSON error body OpenAI clients expect."""
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def as_api_error(exc: Exception) -> APIError:
    """The one mapping from engine and input errors to HTTP statuses."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestError):
        return APIError(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, EngineOverloadedError):
        return APIError(503, str(exc), "service_unavailable", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), "service_unavailable")
    if isinstance(exc, TimeoutError):
        return APIError(408, str(exc) or "the request timed out", "timeout_error", code="timeout")
    if isinstance(exc, ValueError):  # chat-template errors and other bad values from the caller
        return APIError(400, str(exc))
    if isinstance(exc, RequestFailedError):
        return APIError(500, str(exc), "internal_error")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line from pydantic's error list, plus the first offending field."""
    parts: dict[str, str] = {}
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ())[1:]]  # drop the leading "body"
        if err.get("type") == "json_invalid":
            return f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        if err.get("type") == "missing" and not loc:
            return "the request body is missing", None
        # A union field fails once per alternative: report the field once, with its first complaint.
        where = loc[0] if loc else "body"
        parts.setdefault(where, f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return "; ".join(parts.values()) or "invalid request", next(iter(parts), None)


def install_error_handlers(app: FastAPI) -> None:
    """Map every failure to an OpenAI error body; validation problems are 400, never 422."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "request_too_large" if exc.status_code == 413 else None  # raised by BodySizeMiddleware
        return error_response(
            exc.status_code, str(exc.detail), "invalid_request_error", code=code, headers=getattr(exc, "headers", None)
        )  # e.g. Allow on a 405

    async def _mapped(_: Request, exc: Exception) -> JSONResponse:
        error = as_api_error(exc)
        if error.status >= 500 and error.type == "internal_error":
            log.error("request failed", exc_info=exc)
        return error_response(error.status, error.message, error.type, error.param, error.code, error.headers)

    # Known kinds, each registered by class: Starlette re-raises whatever reaches its catch-all
    # `Exception` handler, which would print a traceback for a plain 400.
    for kind in (APIError, NanoInferError, ValueError, TimeoutError):
        app.add_exception_handler(kind, _mapped)
    app.add_exception_handler(Exception, _mapped)  # a bug: a 500 body, and the traceback in the log


class APIKeyMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware): it must not wrap `receive`, or disconnects go unseen."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = self.api_key
        if scope["type"] == "http" and key and not _open(scope["path"]) and not _authorized(scope, key):
            response = error_response(
                401,
                "missing or invalid API key (send `Authorization: Bearer KEY`)",
                "authentication_error",
                code="invalid_api_key",
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _open(path: str) -> bool:
    """True for the paths that answer without the key."""
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def _authorized(scope: Scope, key: str) -> bool:
    """True when the request carries `Authorization: Bearer <key>`."""
    header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    # compare_digest: the time taken must not tell how much of the key was right.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


class BodySizeMiddleware:
    """413 for a body over `max_bytes`, judged from Content-Length or, when that is absent or
    lies, while the body streams in: nothing is buffered past the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(413, self._message(), "invalid_request_error", code="request_too_large")(
                scope, receive, send
            )
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI passes HTTPException through its body parsing; our handler renders it.
                    raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"the request body exceeds this server's limit of {self.max_bytes} bytes"
