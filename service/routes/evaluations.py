"""`/v1/evaluations`: certify a whole uploaded dataset (every k-th example, in order) as one
job; its result is the summary (certified accuracy over radii, ACR, abstention rate, ...),
and `curve.png` and `results.tsv` are served beside it once it has succeeded."""

from __future__ import annotations

from fastapi import Response
from starlette.concurrency import run_in_threadpool

from service import jobs, parameters
from service.datasets import dataset_input
from service.deps import CallerDep, StoreDep
from service.errors import APIError, NotFound, responses
from service.routes.job_routes import job_router
from service.schemas import (
    EVALUATION_EXAMPLES,
    EVALUATION_FORM_EXAMPLE,
    EvaluationOut,
    EvaluationParams,
    EvaluationRequest,
)

ARTIFACTS = {"curve.png": "image/png", "results.tsv": "text/tab-separated-values"}

router = job_router(
    "evaluation", request_model=EvaluationRequest, params_model=EvaluationParams,
    out_model=EvaluationOut, to_request=parameters.evaluation, decode=dataset_input,
    file_field="dataset", json_examples=EVALUATION_EXAMPLES, form_example=EVALUATION_FORM_EXAMPLE,
    summary="Queue an evaluation of an uploaded dataset (multipart `dataset`: an .npz or a zip "
            "of class folders); answers 202 and the job's `Location`.",
)


async def _artifact(store, caller, job_id: str, name: str) -> Response:
    job = await jobs.find(store, caller, "evaluation", job_id)
    if job.status != "succeeded":
        raise APIError(409, "job_not_finished", f"evaluation {job_id} is {job.status}; "
                       f"{name} exists once it has succeeded")
    data = await run_in_threadpool(store.get_artifact, job_id, name)
    if data is None:
        raise NotFound(f"evaluation {job_id} has no {name} (it expired)")
    return Response(data, media_type=ARTIFACTS[name])


@router.get("/{job_id}/curve.png", name="get_evaluation_curve", response_class=Response,
            responses={200: {"content": {"image/png": {}}}, **responses(401, 404, 409, 503)})
async def get_evaluation_curve(job_id: str, store: StoreDep, caller: CallerDep) -> Response:
    """Certified accuracy against radius, as a PNG."""
    return await _artifact(store, caller, job_id, "curve.png")


@router.get("/{job_id}/results.tsv", name="get_evaluation_results", response_class=Response,
            responses={200: {"content": {"text/tab-separated-values": {}}}, **responses(401, 404, 409, 503)})
async def get_evaluation_results(job_id: str, store: StoreDep, caller: CallerDep) -> Response:
    """One row per certified example (Cohen-style columns)."""
    return await _artifact(store, caller, job_id, "results.tsv")
