"""The FastAPI application: `create_app(settings, store)`, and `app` for uvicorn
(`uvicorn service.main:app`).

Building the app connects to nothing (the Redis pool connects on first use), so importing
this module needs no Redis. The API never imports torch or the workers: it validates with
the engine's torch-free modules and enqueues tasks by name.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

import redis
from fastapi import FastAPI
from fastapi.routing import APIRoute
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from service import console, errors
from service.config import Settings, get_settings
from service.routes import certifications, evaluations, health, infer, limits, metrics, models, predictions
from service.schemas import (
    CertificationParams,
    CertificationRequest,
    EvaluationParams,
    EvaluationRequest,
    InferRequest,
    PredictionParams,
    PredictionRequest,
)
from service.store import Store
from smoothcert import __version__

# Multipart framing around an uploaded bundle, on top of the bundle's own size limit.
UPLOAD_OVERHEAD_BYTES = 64 * 1024
_MANUAL_BODIES = (CertificationRequest, CertificationParams, PredictionRequest, PredictionParams,
                  EvaluationRequest, EvaluationParams, InferRequest)


TAGS = [
    {"name": "certifications", "description": "CERTIFY jobs: a class and an ℓ2 radius, or an abstention."},
    {"name": "predictions", "description": "PREDICT jobs: the smoothed class, or an abstention; no radius."},
    {"name": "evaluations", "description": "Certify a whole uploaded data set; its curve and rows."},
    {"name": "models", "description": "The registry (uploads and deletions need an admin key) and each "
                                      "model's certificate memories."},
    {"name": "limits", "description": "The request limits of this deployment."},
    {"name": "inference", "description": "The Open Inference Protocol v2; errors are `{\"error\": \"<message>\"}`."},
    {"name": "health", "description": "Liveness and readiness; no key."},
    {"name": "metrics", "description": "Prometheus text; no key."},
]
# FastAPI documents a 422 `HTTPValidationError` on every route with parameters; this API never
# answers that body (service.errors turns validation errors into `ErrorBody`, or the /v2 body).
_FASTAPI_VALIDATION = ("HTTPValidationError", "ValidationError")


def operation_id(route: APIRoute) -> str:
    """Stable OpenAPI operation ids: the route's name (`create_certification`, `list_models`),
    a contract for generated clients (method names in most generators). Unique: the schema
    is refused with two routes of one name."""
    return route.name


def default_store(settings: Settings) -> Store:
    """A store whose client fails fast when Redis is down (the API answers 503 at once)."""
    client = redis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=2, socket_timeout=10,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 2),
    )
    return Store(client, prefix=settings.key_prefix, job_ttl_seconds=settings.job_ttl_seconds)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated schema, plus the bodies that routes read themselves (JSON or form)."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in _MANUAL_BODIES:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        ids = [op["operationId"] for path in schema["paths"].values() for op in path.values()]
        if len(ids) != len(set(ids)):  # a generated client would get two methods of one name
            app.openapi_schema = None
            raise RuntimeError(f"two routes share an operation id: {sorted({i for i in ids if ids.count(i) > 1})}")
        for operation in (op for path in schema["paths"].values() for op in path.values()):
            documented = operation.get("responses", {}).get("422", {})
            ref = documented.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
            if ref.rsplit("/", 1)[-1] in _FASTAPI_VALIDATION:  # a route that answers 422 declares it (ErrorBody)
                del operation["responses"]["422"]
        for name in _FASTAPI_VALIDATION:
            components.pop(name, None)
    return app.openapi_schema


def create_app(settings: Settings | None = None, store: Store | None = None) -> FastAPI:
    settings = settings or get_settings()
    own_store = store is None
    store = store or default_store(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if own_store:
            store.r.close()

    app = FastAPI(
        title="smoothcert", version=__version__, lifespan=lifespan,
        description="Certified predictions for image classifiers by Gaussian randomized smoothing "
                    "(docs/api.md). Send `Authorization: Bearer <key>` where keys are configured. Errors "
                    "answer `{\"error\": {\"code\", \"message\"}}` (the /v2 routes: `{\"error\": \"<message>\"}`). "
                    "The web console is at `/`.",
        openapi_tags=TAGS, generate_unique_id_function=operation_id,
        docs_url=None, redoc_url=None,  # the offline /docs is service.console's
    )
    app.state.settings = settings
    app.state.store = store
    errors.install(app)
    app.add_middleware(errors.BodyLimit, default=settings.max_body_bytes, limits={
        ("POST", "/v1/models"): settings.max_bundle_bytes + UPLOAD_OVERHEAD_BYTES,
        ("POST", "/v1/evaluations"): settings.max_dataset_bytes + UPLOAD_OVERHEAD_BYTES})
    for module in (certifications, predictions, evaluations, models, limits, infer, health, metrics):
        app.include_router(module.router)
    console.install(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


app = create_app()
