"""`GET /v1/limits`: the request limits of this deployment, read-only, so that a client (the
web console) can show them before a request is refused for one. Nothing secret: the keys and
Redis settings are not in it."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import CallerDep, SettingsDep
from service.errors import responses
from service.schemas import LimitsOut, MemoryRulesOut

router = APIRouter(prefix="/v1/limits", tags=["limits"])


@router.get("", response_model=LimitsOut, name="get_limits", responses=responses(401))
async def get_limits(settings: SettingsDep, caller: CallerDep) -> LimitsOut:
    """The settings that bound a request (`SMOOTHCERT_MAX_N`, `SMOOTHCERT_MAX_ALPHA`, …) and the
    memory's rules; each is enforced at submit with a 4xx naming it."""
    return LimitsOut(
        max_n=settings.max_n, max_n0=settings.max_n0, max_alpha=settings.max_alpha,
        max_batch_size=settings.max_batch_size, max_pixels=settings.max_pixels,
        max_body_bytes=settings.max_body_bytes, max_bundle_bytes=settings.max_bundle_bytes,
        max_dataset_bytes=settings.max_dataset_bytes, max_evaluation_examples=settings.max_evaluation_examples,
        max_wait_seconds=settings.max_wait_seconds, job_ttl_seconds=settings.job_ttl_seconds,
        job_time_limit_seconds=settings.job_time_limit_seconds,
        rate_limit_per_second=settings.rate_limit_per_second,
        rate_limit_burst=settings.rate_burst if settings.rate_limit_per_second else 0,
        max_open_jobs_per_key=settings.max_open_jobs_per_key,
        memory=MemoryRulesOut(levels=settings.memory_alphas, min_n=settings.memory_min_n,
                              quota_per_key=settings.memory_quota_per_key, capacity=settings.memory_capacity),
    )
