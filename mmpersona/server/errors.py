"""Errors as the API sends them: OpenAI's body, `{"error": {"message", "type", "code"}}`, with the status our
exceptions map to; the handlers that make every failure one, and the request body limit (413)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import MmpersonaError
from .keys import KeysUnavailable
from .worker import QueueFull

logger = logging.getLogger("mmpersona.server")


class ApiError(Exception):
    """An error with its HTTP status and OpenAI-style type and code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str = "invalid_request",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type, code, headers


def error_body(message: str, type: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "code": code, "param": None}}


def as_api_error(exc: BaseException) -> ApiError:
    """Our exceptions as HTTP errors: the message is the library's own (written for the user)."""
    from concept_db.types import ConceptNotFound, DuplicateConceptError, QuotaExceeded

    from ..cancel import Cancelled
    from ..errors import ModelUnavailableError

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), "server_busy", "queue_full", {"Retry-After": str(exc.retry_after)})
    if isinstance(exc, ConceptNotFound):
        return ApiError(404, str(exc.args[0]) if exc.args else "not found", "not_found_error", "not_found")
    if isinstance(exc, QuotaExceeded):  # not a 429: waiting does not help, deleting does
        return ApiError(403, str(exc), "insufficient_quota", "quota_exceeded")
    if isinstance(exc, DuplicateConceptError):
        return ApiError(409, str(exc), "conflict_error", "conflict")
    if isinstance(exc, Cancelled):  # nobody is listening; 499 as nginx logs a client that closed its request
        return ApiError(499, str(exc), "request_cancelled", "client_closed_request")
    if isinstance(exc, KeysUnavailable):
        return ApiError(503, str(exc), "server_error", "keys_unavailable", {"Retry-After": "10"})
    if isinstance(exc, ModelUnavailableError):
        return ApiError(503, str(exc), "server_error", "model_unavailable")
    if isinstance(exc, MmpersonaError):
        return ApiError(400, str(exc), "invalid_request_error", "invalid_request")
    ref = uuid.uuid4().hex[:12]
    logger.error("internal error %s", ref, exc_info=exc)
    return ApiError(500, f"internal server error (logged as {ref})", "server_error", "internal_error")


def error_response(exc: BaseException) -> JSONResponse:
    e = as_api_error(exc)
    return JSONResponse(error_body(e.message, e.type, e.code), status_code=e.status, headers=e.headers)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 before it is read further (by
    its Content-Length, or as it arrives when it is sent in chunks)."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = _too_big(self.limit)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error_response(too_big)(scope, receive, send)
        seen = 0
        started = False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooBig
            return message

        async def sending(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except _TooBig:
            if not started:
                await error_response(too_big)(scope, receive, send)


class _TooBig(Exception):
    pass


def _too_big(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over the limit of {limit} bytes", "invalid_request_error",
                    "request_too_large")


def install(app: FastAPI, max_body_bytes: int) -> None:
    """Every failure of `app` as OpenAI's error body, and bodies over `max_body_bytes` refused with 413."""
    app.add_middleware(BodyLimit, limit=max_body_bytes)

    async def on_error(request: Request, exc: Exception):
        return error_response(exc)

    # ours are answered where they are raised; anything else is a 500 (logged, with a reference)
    for kind in (ApiError, MmpersonaError, QueueFull, Exception):
        app.add_exception_handler(kind, on_error)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, _TooBig):  # the body limit, met while FastAPI parsed the body
            return error_response(_too_big(max_body_bytes))
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        return JSONResponse(error_body(str(exc.detail), kind, None), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid request")
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_request"), status_code=400)
