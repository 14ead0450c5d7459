"""`/v1/certifications`: submit a certification (JSON or multipart), read it (long-poll
with `?wait=`), cancel it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from service import jobs, parameters
from service.bodies import read_job_body, request_body_doc
from service.deps import CallerDep, IdempotencyKeyDep, SettingsDep, StoreDep
from service.errors import responses
from service.inputs import decode_input
from service.schemas import (
    CertificationOut,
    CertificationParams,
    CertificationRequest,
    JobStatus,
)

router = APIRouter(prefix="/v1/certifications", tags=["certifications"])

WaitQuery = Annotated[float, Query(ge=0, description="long-poll: wait up to this many seconds "
                                                     "(capped by the server) for the job to end")]


@router.post(
    "", status_code=202, response_model=CertificationOut,
    openapi_extra=request_body_doc(CertificationRequest, CertificationParams),
    responses=responses(401, 404, 409, 413, 415, 422, 429, 503),
)
async def create_certification(
    request: Request, response: Response, settings: SettingsDep, store: StoreDep,
    caller: CallerDep, idempotency_key: IdempotencyKeyDep = None,
) -> CertificationOut:
    """Queue a certification; answers 202 and the job's `Location`."""
    params, upload = await read_job_body(request, CertificationRequest, CertificationParams)
    model = await jobs.find_model(store, params.model)
    spec = parameters.model_spec(model)
    job_request = parameters.certification(params, spec, settings)
    source = upload if upload is not None else params.input
    input_bytes = await run_in_threadpool(decode_input, source, spec, max_pixels=settings.max_pixels)
    job = await jobs.submit(store, settings, caller, "certification", model, job_request,
                            input_bytes, idempotency_key, seed_given=params.seed is not None)
    response.headers["Location"] = f"/v1/certifications/{job.id}"
    return CertificationOut(id=job.id, status=job.status)


@router.get("/{job_id}", response_model=JobStatus, responses=responses(401, 404, 422, 503))
async def get_certification(job_id: str, settings: SettingsDep, store: StoreDep,
                            caller: CallerDep, wait: WaitQuery = 0) -> JobStatus:
    """The job's status, progress and result."""
    seconds = min(wait, settings.max_wait_seconds)
    return jobs.status(await jobs.wait(store, caller, "certification", job_id, seconds))


@router.delete("/{job_id}", status_code=202, response_model=JobStatus,
               responses=responses(401, 404, 503))
async def cancel_certification(job_id: str, store: StoreDep, caller: CallerDep) -> JobStatus:
    """Cancel: a queued job at once, a running one at its next batch."""
    return jobs.status(await jobs.cancel(store, caller, "certification", job_id))
