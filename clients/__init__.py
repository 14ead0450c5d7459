"""Python SDK for the smoothcert HTTP API (sync and async, on httpx).

```python
from clients import Client

with Client("http://127.0.0.1:8000") as sc:
    job = sc.certify("digit.png", model="digits", sigma_search="ddrs", seed=7)
    status = job.wait(timeout=600).raise_for_status()
    print(status.result.prediction, status.result.radius)
```
It talks to the server over HTTP only and imports neither the engine nor torch.
"""

from __future__ import annotations

from clients._base import DEFAULT_URL, CertifyOptions, PredictOptions
from clients._client import AsyncClient, Client
from clients._exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InputError,
    InternalServerError,
    JobFailed,
    JobTimeout,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    SmoothcertError,
    UnprocessableEntityError,
)
from clients._jobs import AsyncJob, Job
from clients._types import (
    CertificateResult,
    ErrorInfo,
    JobStatus,
    MemoryInfo,
    ModelInfo,
    ModelMemory,
    ModelRef,
    PredictionResult,
    Progress,
)

__all__ = [
    "DEFAULT_URL",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncJob",
    "AuthenticationError",
    "BadRequestError",
    "CertificateResult",
    "CertifyOptions",
    "Client",
    "ConflictError",
    "ErrorInfo",
    "InputError",
    "InternalServerError",
    "Job",
    "JobFailed",
    "JobStatus",
    "JobTimeout",
    "MemoryInfo",
    "ModelInfo",
    "ModelMemory",
    "ModelRef",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PredictOptions",
    "PredictionResult",
    "Progress",
    "RateLimitError",
    "ServiceUnavailableError",
    "SmoothcertError",
    "UnprocessableEntityError",
]
