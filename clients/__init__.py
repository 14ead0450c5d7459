"""Python SDK for the smoothcert HTTP API (sync and async, on httpx).

```python
from clients import Client

with Client("http://127.0.0.1:8000") as sc:
    job = sc.certify("digit.png", model="digits", sigma_search="ddrs", seed=7)
    status = job.wait(timeout=600).raise_for_status()
    print(status.result.prediction, status.result.radius)
```
It talks to the server over HTTP only and imports neither the engine nor torch. Names load
on first use (PEP 562), so `import clients.cli` (the `smoothcert` commands) loads no httpx.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CertifyOptions": "clients._base",
    "DEFAULT_URL": "clients._base",
    "EvaluateOptions": "clients._base",
    "PredictOptions": "clients._base",
    "AsyncClient": "clients._client",
    "Client": "clients._client",
    "APIConnectionError": "clients._exceptions",
    "APIStatusError": "clients._exceptions",
    "APITimeoutError": "clients._exceptions",
    "AuthenticationError": "clients._exceptions",
    "BadRequestError": "clients._exceptions",
    "ConflictError": "clients._exceptions",
    "InputError": "clients._exceptions",
    "InternalServerError": "clients._exceptions",
    "JobFailed": "clients._exceptions",
    "JobTimeout": "clients._exceptions",
    "NotFoundError": "clients._exceptions",
    "PayloadTooLargeError": "clients._exceptions",
    "PermissionDeniedError": "clients._exceptions",
    "RateLimitError": "clients._exceptions",
    "ServiceUnavailableError": "clients._exceptions",
    "SmoothcertError": "clients._exceptions",
    "UnprocessableEntityError": "clients._exceptions",
    "AsyncJob": "clients._jobs",
    "Job": "clients._jobs",
    "CertificateResult": "clients._types",
    "ErrorInfo": "clients._types",
    "EvaluationResult": "clients._types",
    "JobStatus": "clients._types",
    "MemoryInfo": "clients._types",
    "ModelInfo": "clients._types",
    "ModelMemory": "clients._types",
    "ModelRef": "clients._types",
    "PredictionResult": "clients._types",
    "Progress": "clients._types",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # once loaded, an ordinary attribute
        return value
    raise AttributeError(f"module 'clients' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

