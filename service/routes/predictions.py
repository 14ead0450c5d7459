"""`/v1/predictions`: PREDICT jobs (the smoothed class or an abstention; no radius)."""

from __future__ import annotations

from service import parameters
from service.routes.job_routes import job_router
from service.schemas import (
    PREDICTION_EXAMPLES,
    PREDICTION_FORM_EXAMPLE,
    PredictionOut,
    PredictionParams,
    PredictionRequest,
)

router = job_router(
    "prediction", request_model=PredictionRequest, params_model=PredictionParams,
    out_model=PredictionOut, to_request=parameters.prediction,
    summary="Queue a smoothed prediction (PREDICT); answers 202 and the job's `Location`.",
    json_examples=PREDICTION_EXAMPLES, form_example=PREDICTION_FORM_EXAMPLE,
)
