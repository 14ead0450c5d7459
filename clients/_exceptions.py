"""Every error the SDK raises, rooted at `SmoothcertError`.

```
SmoothcertError
├── InputError(ValueError)        an image or bundle the client cannot send (nothing was sent)
├── APIConnectionError            the request did not get an HTTP answer
│   └── APITimeoutError           ... because it timed out
├── APIStatusError                the server answered 4xx/5xx: .status_code .code .message .response
│   ├── BadRequestError           400
│   ├── AuthenticationError       401
│   ├── PermissionDeniedError     403
│   ├── NotFoundError             404
│   ├── ConflictError             409
│   ├── PayloadTooLargeError      413
│   ├── UnprocessableEntityError  422
│   ├── RateLimitError            429 (.retry_after)
│   └── InternalServerError       any status ≥ 500
│       └── ServiceUnavailableError  503
├── JobFailed                     a job ended "failed": .job_id .code .message .status
└── JobTimeout(TimeoutError)      wait() gave up before the job ended: .job_id .status
```
Other 4xx statuses raise `APIStatusError` itself. `status_error` picks the class from the
response and parses the body: the contract's `{"error": {"code", "message"}}`, FastAPI's
`{"detail": ...}`, or plain text.
"""

from __future__ import annotations

import email.utils
import time
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from clients._types import JobStatus

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "InputError",
    "InternalServerError",
    "JobFailed",
    "JobTimeout",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServiceUnavailableError",
    "SmoothcertError",
    "UnprocessableEntityError",
    "status_error",
]


class SmoothcertError(Exception):
    """Base of every error raised by the smoothcert client."""


class InputError(SmoothcertError, ValueError):
    """The client refused an input before sending it (unknown format, unreadable file)."""


class APIConnectionError(SmoothcertError):
    """No HTTP answer: the server is unreachable, the connection broke, or TLS failed."""


class APITimeoutError(APIConnectionError):
    """The request ran past the client's timeout."""


class APIStatusError(SmoothcertError):
    """The server answered with a 4xx or 5xx status."""

    def __init__(self, message: str, *, response: httpx.Response, code: str | None = None):
        super().__init__(f"{message} (HTTP {response.status_code}{f', {code}' if code else ''})")
        self.message, self.code, self.response = message, code, response
        self.status_code = response.status_code


class BadRequestError(APIStatusError):
    """400."""


class AuthenticationError(APIStatusError):
    """401: missing or wrong API key."""


class PermissionDeniedError(APIStatusError):
    """403."""


class NotFoundError(APIStatusError):
    """404: no such job or model."""


class ConflictError(APIStatusError):
    """409: e.g. cancelling a job that already ended, or a reused Idempotency-Key."""


class PayloadTooLargeError(APIStatusError):
    """413: the image or bundle is over the server's size limit."""


class UnprocessableEntityError(APIStatusError):
    """422: the request was understood but refused (bad parameters, wrong input shape)."""


class RateLimitError(APIStatusError):
    """429. `retry_after` is the server's Retry-After in seconds, or None."""

    def __init__(self, message: str, *, response: httpx.Response, code: str | None = None):
        super().__init__(message, response=response, code=code)
        self.retry_after = _retry_after(response.headers.get("retry-after"))


class InternalServerError(APIStatusError):
    """Any status ≥ 500."""


class ServiceUnavailableError(InternalServerError):
    """503: the service is up but cannot work now (no worker, Redis down)."""


class JobFailed(SmoothcertError):
    """A job ended with status "failed"; raised by `JobStatus.raise_for_status()`."""

    def __init__(self, job_id: str, code: str | None, message: str, status: JobStatus | None = None):
        super().__init__(f"job {job_id} failed: {f'{code}: ' if code else ''}{message}")
        self.job_id, self.code, self.message, self.status = job_id, code, message, status


class JobTimeout(SmoothcertError, TimeoutError):
    """`wait()` ran out of time; the job goes on and `status` is the last one seen."""

    def __init__(self, job_id: str, timeout: float, status: JobStatus | None = None):
        last = f" (last status: {status.status})" if status is not None else ""
        super().__init__(f"job {job_id} did not finish within {timeout:g} s{last}")
        self.job_id, self.timeout, self.status = job_id, timeout, status


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def status_error(response: httpx.Response) -> APIStatusError:
    """The error for a 4xx/5xx response, its code and message read from the body."""
    code, message = _parse_error_body(response)
    status = response.status_code
    cls = _BY_STATUS.get(status) or (InternalServerError if status >= 500 else APIStatusError)
    return cls(message, response=response, code=code)


def _parse_error_body(response: httpx.Response) -> tuple[str | None, str]:
    try:
        body: Any = response.json()
    except ValueError:  # not JSON: a proxy's HTML page, an empty body
        text = response.text.strip()
        return None, text[:500] or response.reason_phrase or f"HTTP {response.status_code}"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        return _str_or_none(err.get("code")), str(err.get("message") or err.get("code") or body)
    if isinstance(body, dict) and "detail" in body:
        return None, _detail_message(body["detail"])
    return None, str(body)[:500]


def _detail_message(detail: Any) -> str:
    """FastAPI's `detail`: a string, or validation errors `[{"loc": [...], "msg": ...}]`."""
    if isinstance(detail, list) and all(isinstance(d, dict) for d in detail):
        parts = []
        for d in detail:
            loc = ".".join(str(p) for p in d.get("loc", ()) if p != "body")
            parts.append(f"{loc}: {d.get('msg', d)}" if loc else str(d.get("msg", d)))
        return "; ".join(parts)
    return str(detail)


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
