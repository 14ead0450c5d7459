"""`/v1/certifications`: CERTIFY jobs (a class and an ℓ2 radius, or an abstention)."""

from __future__ import annotations

from service import parameters
from service.routes.job_routes import job_router
from service.schemas import (
    CERTIFICATION_EXAMPLES,
    CERTIFICATION_FORM_EXAMPLE,
    CertificationOut,
    CertificationParams,
    CertificationRequest,
)

router = job_router(
    "certification", request_model=CertificationRequest, params_model=CertificationParams,
    out_model=CertificationOut, to_request=parameters.certification,
    summary="Queue a certification; answers 202 and the job's `Location`.",
    json_examples=CERTIFICATION_EXAMPLES, form_example=CERTIFICATION_FORM_EXAMPLE,
)
