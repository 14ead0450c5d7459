"""A request's parameters checked against its model and the service limits, as the dict
the worker reads (and an auditor re-runs).

The engine's own checks (`smoothcert.bounds`, `smoothcert.search`) decide what can never
succeed, so the API refuses exactly what a worker would. A missing seed is drawn here and
stored, so that a redelivered task and an audit derive the same samples.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

from service.config import Settings
from service.errors import APIError, InvalidRequest
from service.schemas import CertificationParams, EvaluationParams, PredictOptions
from service.store import ModelRecord
from smoothcert.adaptive import check_sampling
from smoothcert.bounds import (
    InvalidParameters,
    check_certify,
    check_predict,
    check_sigma,
)
from smoothcert.manifest import BundleError, ModelSpec
from smoothcert.modes import canonical_mode
from smoothcert.search import SigmaSearch
from smoothcert.sequential import check_target


def model_spec(record: ModelRecord) -> ModelSpec:
    try:
        return ModelSpec.from_json(record.spec)
    except BundleError as exc:  # the registry holds only vetted specs: this is our fault
        raise APIError(500, "invalid_model", f"model {record.name!r} has an unusable spec: {exc}") from None


def _limit(name: str, value: int | None, limit: int, setting: str) -> None:
    if value is not None and value > limit:
        raise InvalidRequest(f"{name}: {value} is above this service's limit of {limit} "
                             f"(SMOOTHCERT_{setting.upper()})")


def _sigma(sigma: float | None, spec: ModelSpec) -> float:
    s = spec.sigma
    sigma = s.default if sigma is None else sigma
    check_sigma(sigma, s.min, s.max)
    return float(sigma)


def _seed(seed: int | None) -> int:
    return secrets.randbits(63) if seed is None else seed


def _mode(name: str | None) -> str:
    try:
        return canonical_mode(name)
    except InvalidParameters as exc:
        raise InvalidRequest(str(exc)) from None


def certification(p: CertificationParams, spec: ModelSpec, settings: Settings) -> dict[str, Any]:
    """The stored request of a certification: sigma, sigma_search, bound, n0, n, alpha,
    sampling, tolerance (None unless adaptive), target_radius (None unless sequential),
    batch_size (None: the worker's automatic size), numeric_mode, memory, seed (every other
    default resolved)."""
    _limit("n", p.n, settings.max_n, "max_n")
    _limit("n0", p.n0, settings.max_n0, "max_n0")
    _limit("batch_size", p.batch_size, settings.max_batch_size, "max_batch_size")
    drs = spec.kind == "drs"
    bound = p.bound or ("drs" if drs else "cohen")
    if drs and bound != "drs":
        raise InvalidRequest(f"bound: model {spec.name!r} is a DRS model: omit bound or use 'drs'")
    if not drs and bound == "drs":
        raise InvalidRequest(f"bound: 'drs' needs a DRS model; {spec.name!r} takes cohen or two_sided")
    if drs and p.sigma_search is not None:
        raise InvalidRequest("sigma_search: not available for DRS models; give a fixed sigma")
    try:
        check_certify(p.n0, p.n, p.alpha, p.batch_size, bound)
        tolerance = check_sampling(p.sampling, p.tolerance)
        target_radius = check_target(p.sampling, p.target_radius)
        search = None
        if p.sigma_search is not None:
            resolved = SigmaSearch(**p.sigma_search.model_dump()).resolved()
            if resolved.init is not None:
                check_sigma(resolved.init, spec.sigma.min, spec.sigma.max)
            search = dataclasses.asdict(resolved)
        sigma = None if search is not None else _sigma(p.sigma, spec)
    except InvalidParameters as exc:
        raise InvalidRequest(str(exc)) from None
    return {
        "sigma": sigma, "sigma_search": search, "bound": bound, "n0": p.n0, "n": p.n,
        "alpha": p.alpha, "sampling": p.sampling, "tolerance": tolerance, "target_radius": target_radius,
        "batch_size": p.batch_size, "numeric_mode": _mode(p.numeric_mode),
        "memory": p.memory if p.memory is not None else search is not None,
        "seed": _seed(p.seed),
    }


def evaluation(p: EvaluationParams, spec: ModelSpec, settings: Settings) -> dict[str, Any]:
    """The stored request of an evaluation: a certification's, plus every and limit."""
    return certification(p, spec, settings) | {"every": p.every, "limit": p.limit}


def prediction(p: PredictOptions, spec: ModelSpec, settings: Settings) -> dict[str, Any]:
    """The stored request of a prediction: sigma, n, alpha, batch_size, numeric_mode, seed."""
    if spec.kind == "drs":
        raise InvalidRequest(f"model {spec.name!r} is a DRS model: it certifies, it does not predict")
    _limit("n", p.n, settings.max_n, "max_n")
    _limit("batch_size", p.batch_size, settings.max_batch_size, "max_batch_size")
    try:
        check_predict(p.n, p.alpha, p.batch_size)
        sigma = _sigma(p.sigma, spec)
    except InvalidParameters as exc:
        raise InvalidRequest(str(exc)) from None
    return {"sigma": sigma, "n": p.n, "alpha": p.alpha, "batch_size": p.batch_size,
            "numeric_mode": _mode(p.numeric_mode), "seed": _seed(p.seed)}
