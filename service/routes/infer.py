"""The Open Inference Protocol (v2) REST routes, for serving stacks (Triton's and KServe's
clients, Seldon): server metadata, model metadata and readiness, and inference, each model
route also under `/versions/{version}` (the version is the bundle's digest; another is 404).

Inference is synchronous over asynchronous jobs: each element of the input batch becomes
its own job (PREDICT by default; CERTIFY with `parameters.smoothcert_task = "certify"`, at a
fixed σ with the memory off), seeded `element_seed(seed, i)` from the request's seed or one
the service draws, and the route waits for them all up to the server's longest wait (or the
request's shorter `timeout`). Past it the answer is 504 naming the jobs, which keep running
and can be polled at /v1. Errors are the protocol's `{"error": "<message>"}` (service.errors).
The protocol half (parsing, outputs, encoding) is `service.oip`.
"""

from __future__ import annotations

import math
from typing import Any

import anyio
import numpy as np
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from service import jobs, oip, parameters
from service.config import Settings
from service.deps import Caller, CallerDep, SettingsDep, StoreDep
from service.errors import APIError, NotFound, TooManyRequests
from service.inputs import to_npy
from service.oip import ModelMetadataOut, ModelReadyOut, ServerMetadataOut, oip_responses
from service.schemas import INFER_EXAMPLES, InferOut
from service.store import TERMINAL, JobKind, JobRecord, ModelRecord, Store
from smoothcert import __version__
from smoothcert.manifest import ModelSpec

router = APIRouter(tags=["inference"])

# A job's failure as an HTTP status: the request's fault is a 4xx, a remote model's server
# failing is the gateway's 502/503; only a worker failing unexpectedly ("internal") is a 500.
FAILURE_STATUS = {"invalid_request": 400, "bad_model": 409, "cancelled": 409, "time_limit": 504,
                  "enqueue_failed": 503, "remote_error": 502, "remote_unavailable": 503, "remote_changed": 409}
_INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}, "examples": INFER_EXAMPLES},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description": (
        "the binary tensor extension: the JSON request (its length in the Inference-Header-Content-Length "
        "header), then each input's parameters.binary_data_size raw little-endian bytes")}},
}}}


@router.get("/v2", response_model=ServerMetadataOut, name="oip_server_metadata", responses=oip_responses(500))
async def server_metadata() -> ServerMetadataOut:
    """The server's name, version and the protocol extensions it implements."""
    return ServerMetadataOut(name="smoothcert", version=__version__, extensions=list(oip.EXTENSIONS))


async def _model(store: Store, name: str, version: str | None) -> tuple[ModelRecord, ModelSpec]:
    model, spec = await run_in_threadpool(jobs.get_model_spec, store, name)
    if version is not None and version != model.digest:
        raise NotFound(f"model {name!r} has no version {version!r}: its one version is its digest, {model.digest}",
                       code="model_version_not_found")
    return model, spec


async def _metadata(store: Store, name: str, version: str | None) -> ModelMetadataOut:
    model, spec = await _model(store, name, version)
    return oip.model_metadata(model.name, model.digest, spec)


@router.get("/v2/models/{name}", response_model=ModelMetadataOut, name="oip_model_metadata",
            responses=oip_responses(401, 404, 503))
async def model_metadata(name: str, store: StoreDep, caller: CallerDep) -> ModelMetadataOut:
    """The model's input and outputs (-1: the batch dimension), its one version (the digest)."""
    return await _metadata(store, name, None)


@router.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadataOut,
            name="oip_model_version_metadata", responses=oip_responses(401, 404, 503))
async def model_version_metadata(name: str, version: str, store: StoreDep, caller: CallerDep) -> ModelMetadataOut:
    """As `GET /v2/models/{name}`, for the version that is the model's digest (another is 404)."""
    return await _metadata(store, name, version)


async def _ready(settings: Settings, store: Store, name: str, version: str | None) -> ModelReadyOut:
    model, _ = await _model(store, name, version)
    window = 3 * settings.heartbeat_seconds
    if not await run_in_threadpool(store.live_workers, window):
        raise APIError(503, "not_ready", f"model {name!r} is registered but no worker has sent a heartbeat in "
                       f"the last {window:g} s", headers={"Retry-After": "5"})
    return ModelReadyOut(name=model.name, ready=True)


@router.get("/v2/models/{name}/ready", response_model=ModelReadyOut, name="oip_model_ready",
            responses=oip_responses(401, 404, 503))
async def model_ready(name: str, settings: SettingsDep, store: StoreDep, caller: CallerDep) -> ModelReadyOut:
    """200 when the model is registered and a worker is live; 404 unknown, 503 no worker."""
    return await _ready(settings, store, name, None)


@router.get("/v2/models/{name}/versions/{version}/ready", response_model=ModelReadyOut,
            name="oip_model_version_ready", responses=oip_responses(401, 404, 503))
async def model_version_ready(name: str, version: str, settings: SettingsDep, store: StoreDep,
                              caller: CallerDep) -> ModelReadyOut:
    """As `GET /v2/models/{name}/ready`, for the version that is the model's digest."""
    return await _ready(settings, store, name, version)


_INFER_STATUSES = oip_responses(400, 401, 404, 409, 413, 415, 429, 500, 502, 503, 504)


@router.post("/v2/models/{name}/infer", response_model=InferOut, name="oip_infer", openapi_extra=_INFER_BODY,
             responses=_INFER_STATUSES)
async def infer(name: str, request: Request, settings: SettingsDep, store: StoreDep, caller: CallerDep) -> Response:
    """Per input element, the smoothed class (PREDICT; -1 for an abstention) or, with
    `parameters.smoothcert_task = "certify"`, its certificate (docs/api.md)."""
    return await _infer(request, settings, store, caller, name, None)


@router.post("/v2/models/{name}/versions/{version}/infer", response_model=InferOut, name="oip_infer_version",
             openapi_extra=_INFER_BODY, responses=_INFER_STATUSES)
async def infer_version(name: str, version: str, request: Request, settings: SettingsDep, store: StoreDep,
                        caller: CallerDep) -> Response:
    """As `POST /v2/models/{name}/infer`, for the version that is the model's digest."""
    return await _infer(request, settings, store, caller, name, version)


def take_tokens(store: Store, settings: Settings, caller: Caller, elements: int) -> None:
    """A batch of B elements takes B tokens of the caller's bucket (at most the bucket's size,
    so a batch is never refused forever): B jobs cost what B submissions cost. 429 when short."""
    rate = settings.rate_limit_per_second
    if not rate:
        return
    burst = settings.rate_burst
    cost = min(elements, burst)
    wait = store.take_tokens(caller.owner, rate=rate, burst=burst, cost=cost)
    if wait > 0:
        raise TooManyRequests("rate_limited", f"this key may submit {burst} jobs at once, then {rate:g} per second "
                              f"(SMOOTHCERT_RATE_LIMIT_*), a batch taking one per element; this one needs {cost}: "
                              f"retry in {math.ceil(wait)} s", wait)


def submit_all(store: Store, settings: Settings, caller: Caller, kind: JobKind, model: ModelRecord,
               requests: list[dict[str, Any]], images: np.ndarray) -> list[str]:
    """Create and queue one job per element (`requests[i]` on `images[i]`); if one is refused
    (quota, queue full, broker), those already queued are cancelled and the refusal raised: a
    request is taken whole or not."""
    ids: list[str] = []
    try:
        for request, image in zip(requests, images, strict=True):
            ids.append(jobs.submit_blocking(store, settings, caller, kind, model, request, to_npy(image), None,
                                            seed_given=True).id)
    except Exception:
        for job_id in ids:
            store.request_cancel(job_id)
        raise
    return ids


async def wait_all(store: Store, caller: Caller, kind: JobKind, ids: list[str], seconds: float) -> list[JobRecord]:
    """Every job as it is once all have ended, one has failed, or `seconds` have passed."""
    deadline = anyio.current_time() + seconds
    found: list[JobRecord] = []
    for job_id in ids:
        job = await jobs.wait(store, caller, kind, job_id, max(0.0, deadline - anyio.current_time()))
        found.append(job)
        if job.status in TERMINAL and job.status != "succeeded":
            break
    return found


async def _infer(request: Request, settings: Settings, store: Store, caller: Caller, name: str,
                 version: str | None) -> Response:
    model, spec = await _model(store, name, version)
    body = oip.inflate(await request.body(), request.headers.get("content-encoding", ""), settings.max_body_bytes)
    parsed, binary = oip.parse_request(body, request.headers.get(oip.HEADER_LENGTH))
    if parsed.model_name is not None and parsed.model_name != name:
        raise oip.bad(f"model_name {parsed.model_name!r} is not the model of the URL, {name!r}")
    oip.input_dtype(parsed.inputs[0].datatype)
    elements, _ = oip.batch_of(parsed.inputs[0].shape, spec.input_shape)
    if settings.rate_limit_per_second:  # before the work it guards
        await run_in_threadpool(take_tokens, store, settings, caller, elements)
    task = oip.read_task(parsed.parameters, name)
    kind: JobKind
    if task.task == "predict":
        kind, stored = "prediction", parameters.prediction(task.options, spec, settings)
    else:
        kind, stored = "certification", parameters.certification(task.options, spec, settings)
    available = oip.outputs_of(task.task, stored.get("bound"), stored.get("sampling"))
    selected = oip.select_outputs(parsed.outputs, available, task.binary_output, task.task)
    images, _ = await run_in_threadpool(oip.read_images, parsed, binary, spec)
    requests = [{**stored, "seed": oip.element_seed(stored["seed"], i)} for i in range(len(images))]
    ids = await run_in_threadpool(submit_all, store, settings, caller, kind, model, requests, images)

    wait = settings.max_wait_seconds if task.timeout is None else min(task.timeout, settings.max_wait_seconds)
    found = await wait_all(store, caller, kind, ids, wait)
    for i, job in enumerate(found):
        if job.status in TERMINAL and job.status != "succeeded":
            error = job.error or {}
            code = str(error.get("code", job.status))
            poll = f"/v1/{kind}s/{job.id}"
            raise APIError(FAILURE_STATUS.get(code, 500), code,
                           f"element {i} (the {kind} job {job.id}, GET {poll}) {job.status}: "
                           f"{error.get('message', code)}", headers={"Location": poll})
    running = [job.id for job in found if job.status != "succeeded"] + ids[len(found):]
    if running:
        why = "the request's timeout" if task.timeout is not None and task.timeout < settings.max_wait_seconds \
            else "SMOOTHCERT_MAX_WAIT_SECONDS"
        raise APIError(504, "timeout", f"{len(running)} of the {len(ids)} {kind} jobs did not finish within "
                       f"{wait:g} s ({why}); they keep running: poll GET /v1/{kind}s/<id> for each of "
                       f"{', '.join(running)}", headers={"Location": f"/v1/{kind}s/{running[0]}"})

    head: dict[str, Any] = {"model_name": model.name, "model_version": model.digest}
    if parsed.id is not None:
        head["id"] = parsed.id
    head["parameters"] = oip.scalars({oip.TASK: task.task, **stored, "model_digest": model.digest,
                                      "smoothcert_jobs": ",".join(ids)})
    content, headers, media_type = oip.encode_response(head, selected, [job.result or {} for job in found])
    return Response(content, headers=headers, media_type=media_type)
