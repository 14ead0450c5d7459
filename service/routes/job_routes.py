"""The routes of a job kind: submit (JSON or multipart), read (long-poll with `?wait=`),
cancel. Certifications and predictions differ only in their schemas and parameter checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from service import jobs
from service.bodies import read_job_body, request_body_doc
from service.config import Settings
from service.deps import (
    Caller,
    CallerDep,
    StoreDep,
    app_settings,
    app_store,
    read_caller,
    read_idempotency_key,
    submit_openapi,
)
from service.errors import responses
from service.inputs import decode_input, input_sha256
from service.schemas import JobOut, JobStatus
from service.store import JobKind, JobRecord, Store
from smoothcert.manifest import ModelSpec

WaitQuery = Annotated[float, Query(ge=0, description="long-poll: wait up to this many seconds "
                                                     "(capped by the server) for the job to end")]


def image_input(params: Any, upload: bytes | None, spec: ModelSpec, settings: Settings) -> bytes:
    """The stored input of an image job: the uploaded file or the JSON `input`."""
    source = upload if upload is not None else params.input
    return decode_input(source, spec, max_pixels=settings.max_pixels)


def with_examples(doc: dict[str, Any], json_examples: dict[str, Any], form_example: dict[str, Any],
                  file_field: str) -> dict[str, Any]:
    """`request_body_doc`'s `openapi_extra` with named examples on the JSON body and one on
    the form (its fields; the file part named)."""
    content = doc["requestBody"]["content"]
    content["application/json"]["examples"] = json_examples
    content["multipart/form-data"]["examples"] = {"form": {
        "summary": f"The same as form fields, the file as the part '{file_field}'",
        "value": {**form_example, file_field: f"({file_field} file)"}}}
    return doc


def job_router(kind: JobKind, *, request_model: type, params_model: type, out_model: type[JobOut],
               to_request: Callable[..., dict[str, Any]], summary: str, json_examples: dict[str, Any],
               form_example: dict[str, Any], decode: Callable[..., bytes] = image_input,
               file_field: str = "image") -> APIRouter:
    """`/v1/{kind}s` with routes named create_/get_/cancel_{kind} (stable operation ids).
    `decode(params, upload, spec, settings)` makes the stored input (4xx on bad input);
    `json_examples` (OpenAPI named examples) and `form_example` document the two bodies."""
    path = f"/v1/{kind}s"
    router = APIRouter(prefix=path, tags=[f"{kind}s"])

    def _create(params: Any, upload: bytes | None, settings: Settings, store: Store, caller: Caller,
                idempotency_key: str | None) -> JobRecord:
        """Everything after reading the body, blocking, in one thread-pool call (a hop costs
        about as much as the work it carries, and a submit carried three)."""
        jobs.check_rate(store, settings, caller)  # before the work it guards
        model, spec = jobs.get_model_spec(store, params.model)
        job_request = to_request(params, spec, settings)
        input_bytes = decode(params, upload, spec, settings)
        if kind == "certification":  # the decoded pixels, named: image decoders differ (docs/api.md)
            job_request = {**job_request, "input_sha256": input_sha256(input_bytes)}
        return jobs.submit_blocking(store, settings, caller, kind, model, job_request, input_bytes,
                                    idempotency_key, seed_given=params.seed is not None)

    @router.post("", status_code=202, response_model=out_model, name=f"create_{kind}",
                 description=summary,
                 openapi_extra=with_examples(request_body_doc(request_model, params_model, file_field),
                                             json_examples, form_example, file_field) | submit_openapi(),
                 responses=responses(401, 404, 409, 413, 415, 422, 429, 503))
    async def create(request: Request, response: Response):
        # The caller, then the Idempotency-Key, as `CallerDep` and `IdempotencyKeyDep` would
        # give them, without FastAPI's dependency solving (service.deps says why).
        caller = await read_caller(request)
        idempotency_key = read_idempotency_key(request)
        params, upload = await read_job_body(request, request_model, params_model, file_field)
        job = await run_in_threadpool(_create, params, upload, app_settings(request), app_store(request),
                                      caller, idempotency_key)
        response.headers["Location"] = f"{path}/{job.id}"
        return out_model(id=job.id, status=job.status)

    @router.get("/{job_id}", response_model=JobStatus, name=f"get_{kind}",
                description="The job's status, progress and result.",
                responses=responses(401, 404, 422, 503))
    async def get(request: Request, job_id: str, caller: CallerDep, wait: WaitQuery = 0) -> JobStatus:
        seconds = min(wait, app_settings(request).max_wait_seconds)
        return jobs.status(await jobs.wait(app_store(request), caller, kind, job_id, seconds))

    @router.delete("/{job_id}", status_code=202, response_model=JobStatus, name=f"cancel_{kind}",
                   description="Cancel: a queued job at once, a running one at its next batch.",
                   responses=responses(401, 404, 503))
    async def cancel(job_id: str, store: StoreDep, caller: CallerDep) -> JobStatus:
        return jobs.status(await jobs.cancel(store, caller, kind, job_id))

    return router
