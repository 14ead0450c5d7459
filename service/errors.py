"""Errors: one base class that carries its HTTP status, one body, one handler per source.

Every error the API answers has the body `{"error": {"code": "...", "message": "..."}}`
(docs/api.md), whatever raised it: an `APIError` from our code, a request FastAPI could not
validate, Starlette's HTTP errors (unknown route, body too large), the job store being down,
or a bug (a generic 500 that reveals nothing; the traceback goes to the log). The Open
Inference Protocol routes (`/v2`, `/v2/...`) answer the protocol's `{"error": "<message>"}`
instead, and 400 where the rest of the API answers 422 (`error_response`).
"""

from __future__ import annotations

import logging
import math
from http import HTTPStatus
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("smoothcert.api")

REDIS_DOWN = "the job store (Redis) is not reachable; retry shortly"


class APIError(Exception):
    """An answer other than success: HTTP status, stable machine code, message for people."""

    def __init__(self, status: int, code: str, message: str, *,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers
        self.extra = extra or {}


class InvalidRequest(APIError):
    def __init__(self, message: str):
        super().__init__(422, "invalid_request", message)


class InvalidInput(APIError):
    """The image or tensor cannot be decoded, or does not fit the model."""

    def __init__(self, message: str):
        super().__init__(422, "invalid_input", message)


class NotFound(APIError):
    def __init__(self, message: str, code: str = "not_found"):
        super().__init__(404, code, message)


class Unauthorized(APIError):
    def __init__(self, message: str):
        super().__init__(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(APIError):
    def __init__(self, message: str):
        super().__init__(403, "forbidden", message)


class Unavailable(APIError):
    def __init__(self, message: str = REDIS_DOWN, code: str = "unavailable"):
        super().__init__(503, code, message, headers={"Retry-After": "5"})


class TooManyRequests(APIError):
    """429 with Retry-After in whole seconds, rounded up (the header takes no fractions)."""

    def __init__(self, code: str, message: str, retry_after: float):
        super().__init__(429, code, message, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def is_oip(path: str) -> bool:
    """A route of the Open Inference Protocol (v2): `/v2` and everything under it."""
    return path == "/v2" or path.startswith("/v2/")


def error_response(path: str, status: int, code: str, message: str, *,
                   headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """The error answer for a request to `path`. On the OIP routes the body is the protocol's
    `{"error": "<message>"}` (its clients read a string; an object crashes their handlers) and
    a malformed request is 400 as the protocol has it (422 elsewhere); `extra` fields are left
    out there, so a message that must name something (a job id) names it in its words."""
    if is_oip(path):
        return JSONResponse({"error": message}, 400 if status == 422 else status, headers=headers)
    return JSONResponse(error_body(code, message, **extra), status, headers=headers)


def describe_validation(errors: list[dict[str, Any]], limit: int = 5) -> str:
    """Pydantic's errors as one readable line: `field.path: reason; ...`."""
    parts = []
    for err in errors[:limit]:
        if err.get("type") == "json_invalid":  # FastAPI's own JSON parsing
            parts.append(f"the body is not valid JSON: {err.get('ctx', {}).get('error', 'decode error')}")
            continue
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        msg = str(err.get("msg", "is not valid")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more problems")
    return "; ".join(parts) or "the request is not valid"


_HTTP_CODES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type",
               422: "invalid_request", 429: "too_many_requests"}


async def api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(request.scope["path"], exc.status, exc.code, exc.message, headers=exc.headers,
                          **exc.extra)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(request.scope["path"], 422, "invalid_request", describe_validation(list(exc.errors())))


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    status = exc.status_code
    if exc.detail == "There was an error parsing the body":  # FastAPI's words, no reason
        message = "the request body could not be parsed: malformed, or JSON nested too deeply"
    elif isinstance(exc.detail, str):
        message = exc.detail
    else:
        message = HTTPStatus(status).phrase
    code = _HTTP_CODES.get(status, f"http_{status}")
    return error_response(request.scope["path"], status, code, message, headers=getattr(exc, "headers", None))


async def store_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("job store unreachable: %s", type(exc).__name__)
    return error_response(request.scope["path"], 503, "unavailable", REDIS_DOWN, headers={"Retry-After": "5"})


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(request.scope["path"], 500, "internal", "an internal error occurred; it has been logged")


class BodyTooLarge(HTTPException):
    """Raised while the body streams in; an HTTPException so that FastAPI's own body parsing
    lets it through instead of turning it into a 400."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the {limit} bytes this endpoint accepts")


class BodyLimit:
    """413 for a body over the limit: at once from Content-Length, else as soon as the bytes
    read pass it (chunked uploads). `limits` maps (method, path) to a larger or smaller limit."""

    def __init__(self, app: ASGIApp, default: int, limits: dict[tuple[str, str], int] | None = None):
        self.app, self.default, self.limits = app, default, limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.get((scope["method"], scope["path"].rstrip("/")), self.default)
        too_large = BodyTooLarge(limit)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await _send_error(scope, send, too_large)
        received, exceeded, started, replaced = 0, False, False, False

        async def limited() -> Message:
            nonlocal received, exceeded
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                exceeded = True
                raise too_large
            return message

        async def guarded(message: Message) -> None:
            nonlocal started, replaced
            if replaced:
                return
            if message["type"] == "http.response.start":
                started = True
                if exceeded and message["status"] != 413:  # someone swallowed the error
                    replaced = True
                    return await _send_error(scope, send, too_large)
            await send(message)

        try:
            await self.app(scope, limited, guarded)
        except Exception:
            if not exceeded or started:
                raise
            await _send_error(scope, send, too_large)


async def _send_error(scope: Scope, send: Send, exc: HTTPException) -> None:
    async def nothing() -> Message:
        return {"type": "http.disconnect"}

    response = error_response(scope["path"], exc.status_code, _HTTP_CODES[exc.status_code], str(exc.detail))
    await response(scope, nothing, send)


def install(app: FastAPI) -> None:
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(redis.ConnectionError, store_down)
    app.add_exception_handler(redis.TimeoutError, store_down)
    app.add_exception_handler(Exception, internal_error)


# The `code`s each status carries (docs/api.md, Errors), and an answer of each, for the OpenAPI page.
_STATUS_CODES = {
    401: ("`unauthorized`: no key, or an unknown key (with `WWW-Authenticate: Bearer`)", "unauthorized",
          "the API key is not valid"),
    403: ("`forbidden`: an admin route with a non-admin key", "forbidden",
          "this operation needs an admin key (SMOOTHCERT_ADMIN_KEYS)"),
    404: ("`not_found`, `model_not_found`, `job_not_found` (also another key's job)", "model_not_found",
          "no model named 'digit' is registered (GET /v1/models lists them)"),
    409: ("`idempotency_conflict`, `job_not_finished`", "idempotency_conflict",
          "this Idempotency-Key was used for a different request; use a new key for a new request"),
    413: ("`too_large`: the body is over its limit", "too_large",
          "the request body is larger than the 8388608 bytes this endpoint accepts"),
    415: ("`unsupported_media_type`", "unsupported_media_type",
          "send application/json, or multipart/form-data with an 'image' file"),
    422: ("`invalid_request`, `invalid_input`, `invalid_bundle`, `numeric_mode_unavailable`; the message names "
          "the field and, for a limit, the setting", "invalid_request", "n0 (100) must not exceed n (50)"),
    429: ("`rate_limited`, `quota_exceeded`, `queue_full` (with `Retry-After`)", "rate_limited",
          "this key may submit 10 jobs at once, then 1 per second (SMOOTHCERT_RATE_LIMIT_*); retry in 1 s"),
    500: ("`internal`, `invalid_model`", "internal", "an internal error occurred; it has been logged"),
    503: ("`unavailable` (Redis; with `Retry-After`), `enqueue_failed`", "unavailable", REDIS_DOWN),
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route answers, all with the one body
    (`ErrorBody`), the codes each status carries and an example."""
    from service.schemas import ErrorBody

    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {"model": ErrorBody, "description": HTTPStatus(status).phrase}
        if status in _STATUS_CODES:
            codes, code, message = _STATUS_CODES[status]
            out[status]["description"] += f": {codes}"
            out[status]["content"] = {"application/json": {"example": error_body(code, message)}}
    return out
