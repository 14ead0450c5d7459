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

from service import errors
from service.config import Settings, get_settings
from service.routes import certifications, evaluations, health, infer, metrics, models, predictions
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


def operation_id(route: APIRoute) -> str:
    """Stable OpenAPI operation ids (`certifications-create_certification`): a contract for
    generated clients, so a route's function name is part of the API."""
    return f"{route.tags[0] if route.tags else 'api'}-{route.name}"


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
        description="Certified predictions for image classifiers by Gaussian randomized "
                    "smoothing. Errors answer `{\"error\": {\"code\", \"message\"}}`.",
        generate_unique_id_function=operation_id,
    )
    app.state.settings = settings
    app.state.store = store
    errors.install(app)
    app.add_middleware(errors.BodyLimit, default=settings.max_body_bytes, limits={
        ("POST", "/v1/models"): settings.max_bundle_bytes + UPLOAD_OVERHEAD_BYTES,
        ("POST", "/v1/evaluations"): settings.max_dataset_bytes + UPLOAD_OVERHEAD_BYTES})
    for module in (certifications, predictions, evaluations, models, infer, health, metrics):
        app.include_router(module.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


app = create_app()
