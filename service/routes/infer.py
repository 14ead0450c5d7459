"""`POST /v2/models/{name}/infer`: the Open Inference Protocol (v2) for serving stacks.

One input tensor in, one smoothed prediction (PREDICT) out, synchronously: the route
creates a prediction job and waits for it up to the server's longest wait. A job still
running then is answered 504 with its id, to poll at `/v1/predictions/{id}`.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from service import jobs, parameters
from service.deps import CallerDep, SettingsDep, StoreDep
from service.errors import APIError, responses
from service.inputs import decode_tensor
from service.schemas import InferOut, InferRequest

router = APIRouter(prefix="/v2/models", tags=["inference"])

# A job's failure as an HTTP status: the request's fault is a 4xx; only a worker failing
# unexpectedly ("internal") is the server's 500.
FAILURE_STATUS = {"invalid_request": 422, "bad_model": 409, "cancelled": 409, "time_limit": 504,
                  "enqueue_failed": 503}


@router.post("/{name}/infer", response_model=InferOut,
             responses=responses(401, 404, 409, 413, 422, 429, 500, 503, 504))
async def infer(name: str, body: InferRequest, settings: SettingsDep, store: StoreDep,
                caller: CallerDep) -> InferOut:
    """A smoothed prediction: `data` is the class, or -1 when PREDICT abstains."""
    if settings.rate_limit_per_second:
        await run_in_threadpool(jobs.check_rate, store, settings, caller)
    model, spec = await run_in_threadpool(jobs.get_model_spec, store, name)
    request = parameters.prediction(body.parameters, spec, settings)
    tensor = body.inputs[0]
    input_bytes = await run_in_threadpool(decode_tensor, tensor.data, tensor.shape, tensor.datatype,
                                          spec, max_pixels=settings.max_pixels)
    job = await jobs.submit(store, settings, caller, "prediction", model, request, input_bytes,
                            None, seed_given=body.parameters.seed is not None)
    job = await jobs.wait(store, caller, "prediction", job.id, settings.max_wait_seconds)
    poll = f"/v1/predictions/{job.id}"
    if job.status in ("queued", "running"):
        raise APIError(504, "timeout", f"the prediction did not finish within "
                       f"{settings.max_wait_seconds:g} s; poll GET {poll}",
                       headers={"Location": poll}, extra={"id": job.id})
    if job.status != "succeeded":
        error = job.error or {}
        code = str(error.get("code", job.status))
        raise APIError(FAILURE_STATUS.get(code, 500), code,
                       str(error.get("message", f"the prediction {job.status}")),
                       headers={"Location": poll}, extra={"id": job.id})
    result = job.result or {}
    prediction = result.get("prediction")
    return InferOut(
        model_name=model.name, model_version=model.digest, id=job.id,
        outputs=[{"name": "prediction", "shape": [1], "datatype": "INT64",
                  "data": [-1 if prediction is None else int(prediction)]}],
        parameters={"abstained": prediction is None, "label": result.get("label"),
                    "sigma": request["sigma"], "n": request["n"], "alpha": request["alpha"],
                    "seed": request["seed"]},
    )
