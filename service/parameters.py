"""A request's parameters checked against its model and the service limits, as the dict
the worker reads (and an auditor re-runs).

The engine's own checks (`smoothcert.bounds`, `smoothcert.search`) decide what can never
succeed, so the API refuses exactly what a worker would (feasibility is checked with the
largest noise tail any worker device has: smoothcert.noise). A missing seed is drawn here
from the operating system's CSPRNG and stored, so that a redelivered task and an audit derive
the same samples; `seed_source` records who chose it.

With the shared memory on, the rules that keep one caller's certificate from weakening
another's (docs/guarantees.md §2, §3): α from `memory_alphas`, n at least `memory_min_n`, and
no caller seed (a chosen seed can select a lucky draw that every later caller would inherit).
"""

from __future__ import annotations

import dataclasses
import math
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
from smoothcert.noise import tail_mass
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


def _seed(seed: int | None) -> tuple[int, str]:
    """(seed, seed_source): the caller's, or 63 bits from the CSPRNG ("server")."""
    return (secrets.randbits(63), "server") if seed is None else (seed, "caller")


def _alpha(alpha: float, settings: Settings) -> None:
    if alpha > settings.max_alpha:
        raise InvalidRequest(f"alpha: {alpha} is above this service's limit of {settings.max_alpha} "
                             "(SMOOTHCERT_MAX_ALPHA): near 1 a certificate carries no information")


def worst_tail(spec: ModelSpec) -> float:
    """The largest noise tail any worker device takes off this model's bounds (CPU float32)."""
    numel = math.prod(spec.input_shape)
    return tail_mass("cpu", "float32", numel // 2 if spec.kind == "drs" else numel, numel)


def _remote_rules(p: CertificationParams, spec: ModelSpec) -> None:
    """A remote model (docs/bundles.md) has no content digest to key a memory by, and runs in
    its own server's arithmetic: fixed σ, memory off, numeric mode fp32."""
    if p.sigma_search is not None:
        raise InvalidRequest(f"sigma_search: model {spec.name!r} is served remotely; a per-input sigma needs the "
                             "memory, which a remote model (no content digest) cannot have: give a fixed sigma")
    if p.memory:
        raise InvalidRequest(f"memory: model {spec.name!r} is served remotely and has no content digest to key a "
                             "memory by; set memory false")
    if _mode(p.numeric_mode) != "fp32":
        raise InvalidRequest(f"numeric_mode: model {spec.name!r} runs in its own server's arithmetic; use fp32")


def _selector_rules(p: CertificationParams | PredictOptions, spec: ModelSpec) -> None:
    """A σ selector (docs/algorithms.md §6) chooses σ for each input itself, with a certified
    choice, and needs no memory: σ, a σ search or the memory would each change what is
    certified, so each is refused, saying why."""
    what = f"model {spec.name!r} is a sigma selector"
    if p.sigma is not None:
        raise InvalidRequest(f"sigma: {what}: it chooses sigma for each input itself "
                             f"(among {list(spec.selector.sigmas)}); omit sigma")
    if getattr(p, "sigma_search", None) is not None:
        raise InvalidRequest(f"sigma_search: {what}: its estimator chooses sigma for each input with a certified "
                             "choice, no search; omit sigma_search")
    if getattr(p, "memory", None):
        raise InvalidRequest(f"memory: {what}: its per-input sigma is sound without a memory, and its answers never "
                             "depend on earlier ones; set memory false or omit it")


def _shared_memory_rules(p: CertificationParams, settings: Settings) -> None:
    """The shared memory takes only what cannot weaken another caller's answers."""
    if p.alpha not in settings.memory_alphas:
        raise InvalidRequest(
            f"alpha: with the memory on, alpha must be one of {', '.join(map(repr, settings.memory_alphas))} "
            "(SMOOTHCERT_MEMORY_ALPHAS), so that each memory holds certificates of one level; "
            f"got {p.alpha!r}")
    if p.n < settings.memory_min_n:
        raise InvalidRequest(
            f"n: with the memory on, n must be at least {settings.memory_min_n} (SMOOTHCERT_MEMORY_MIN_N): "
            "a commit shapes every later answer near it; with sampling adaptive or sequential this is the "
            "smallest n the estimation may stop at")
    if p.seed is not None:
        raise InvalidRequest(
            "seed: with the memory on the service draws the seed itself and shows it only once the job has "
            "succeeded; a chosen seed could pick a lucky draw that every later caller near this input would "
            "inherit. Omit seed, or set memory false to reproduce a run with your own seed")


def _mode(name: str | None) -> str:
    try:
        return canonical_mode(name)
    except InvalidParameters as exc:
        raise InvalidRequest(str(exc)) from None


def certification(p: CertificationParams, spec: ModelSpec, settings: Settings, *,
                  shared_memory: bool = True) -> dict[str, Any]:
    """The stored request of a certification: sigma, sigma_search, bound, n0, n, alpha,
    sampling, tolerance (None unless adaptive), target_radius (None unless sequential),
    batch_size (None: the worker's automatic size), numeric_mode, memory, seed, seed_source
    (every other default resolved). `shared_memory=False`: the memory, if on, is the job's
    own (an evaluation's), and the shared memory's rules do not apply."""
    _limit("n", p.n, settings.max_n, "max_n")
    _alpha(p.alpha, settings)
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
    if spec.kind == "remote":
        _remote_rules(p, spec)
    selector = spec.kind == "selector"
    if selector:
        _selector_rules(p, spec)
    try:
        check_certify(p.n0, p.n, p.alpha, p.batch_size, bound, worst_tail(spec))
        tolerance = check_sampling(p.sampling, p.tolerance)
        target_radius = check_target(p.sampling, p.target_radius)
        search = None
        if p.sigma_search is not None:
            resolved = SigmaSearch(**p.sigma_search.model_dump()).resolved()
            if resolved.init is not None:
                check_sigma(resolved.init, spec.sigma.min, spec.sigma.max)
            search = dataclasses.asdict(resolved)
        sigma = None if search is not None or selector else _sigma(p.sigma, spec)
    except InvalidParameters as exc:
        raise InvalidRequest(str(exc)) from None
    memory = bool(p.memory) if p.memory is not None else search is not None
    if memory and shared_memory:
        _shared_memory_rules(p, settings)
    seed, source = _seed(p.seed)
    return {
        "sigma": sigma, "sigma_search": search, "bound": bound, "n0": p.n0, "n": p.n,
        "alpha": p.alpha, "sampling": p.sampling, "tolerance": tolerance, "target_radius": target_radius,
        "batch_size": p.batch_size, "numeric_mode": _mode(p.numeric_mode), "memory": memory,
        "seed": seed, "seed_source": source,
    }


def evaluation(p: EvaluationParams, spec: ModelSpec, settings: Settings) -> dict[str, Any]:
    """The stored request of an evaluation: a certification's, plus every and limit. Its
    memory (when on) is its own, fresh for the run and never shared, so a caller's seed and any
    α up to the maximum are allowed: the numbers it reports are the caller's alone."""
    return certification(p, spec, settings, shared_memory=False) | {"every": p.every, "limit": p.limit}


def prediction(p: PredictOptions, spec: ModelSpec, settings: Settings) -> dict[str, Any]:
    """The stored request of a prediction: sigma, n, alpha, batch_size, numeric_mode, seed."""
    if spec.kind == "drs":
        raise InvalidRequest(f"model {spec.name!r} is a DRS model: it certifies, it does not predict")
    if spec.kind == "remote" and _mode(p.numeric_mode) != "fp32":
        raise InvalidRequest(f"numeric_mode: model {spec.name!r} runs in its own server's arithmetic; use fp32")
    if spec.kind == "selector":
        _selector_rules(p, spec)
    _limit("n", p.n, settings.max_n, "max_n")
    _limit("batch_size", p.batch_size, settings.max_batch_size, "max_batch_size")
    _alpha(p.alpha, settings)
    try:
        check_predict(p.n, p.alpha, p.batch_size)
        sigma = None if spec.kind == "selector" else _sigma(p.sigma, spec)
    except InvalidParameters as exc:
        raise InvalidRequest(str(exc)) from None
    seed, source = _seed(p.seed)
    return {"sigma": sigma, "n": p.n, "alpha": p.alpha, "batch_size": p.batch_size,
            "numeric_mode": _mode(p.numeric_mode), "seed": seed, "seed_source": source}
