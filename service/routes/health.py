"""`/v2/health`: liveness (the process answers) and readiness (Redis answers and a worker
has sent a heartbeat lately), as the serving-stack conventions (KServe, Triton) name them.
Open without a key: probes carry none."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.deps import SettingsDep, StoreDep
from service.errors import error_body, responses
from service.schemas import HealthOut

router = APIRouter(prefix="/v2/health", tags=["health"])


@router.get("/live", response_model=HealthOut, name="get_liveness")
async def live() -> HealthOut:
    """200 while the process serves requests."""
    return HealthOut(status="live", live=True)


@router.get("/ready", response_model=HealthOut, name="get_readiness", responses=responses(503))
def ready(settings: SettingsDep, store: StoreDep):
    """200 when Redis answers and at least one worker sent a heartbeat within three
    heartbeat periods; 503 naming what is missing otherwise."""
    if not store.ping():
        return JSONResponse(error_body("not_ready", "the job store (Redis) is not reachable"), 503)
    window = 3 * settings.heartbeat_seconds
    workers = len(store.live_workers(window))
    if not workers:
        return JSONResponse(error_body(
            "not_ready", f"no worker has sent a heartbeat in the last {window:g} s"), 503)
    return HealthOut(status="ready", ready=True, redis=True, workers=workers)
