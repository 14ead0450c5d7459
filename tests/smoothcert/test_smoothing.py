"""CERTIFY and PREDICT against exact answers (docs/algorithms.md §8)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm

from smoothcert.adaptive import DEFAULT_TOLERANCE
from smoothcert.bounds import InvalidParameters
from smoothcert.smoothing import certify, predict

from .exact import HalfSpace, assert_rate_at_most, point_at, rate_is_too_high

SHAPE = (1, 4, 4)
SIGMA = 0.25


@pytest.fixture(scope="module")
def model() -> HalfSpace:
    w = torch.linspace(-1.0, 1.5, 16)
    return HalfSpace(w, b=-0.1).eval()


def certificate_violations(model, bound: str, *, runs: int, n: int, alpha: float,
                           distance_in_sigmas: float, radius_fn=None, **sampling) -> int:
    """How many of `runs` independent certificates claim more than the exact radius.
    `sampling`: sampling="adaptive" (n is then the maximum) and its tolerance."""
    x = point_at(model, SHAPE, distance_in_sigmas * SIGMA)
    exact = abs(float(model.signed_distance(x.unsqueeze(0))))
    truth = 1 if distance_in_sigmas > 0 else 0
    violations = 0
    for seed in range(runs):
        cert = certify(model, x, num_classes=2, sigma=SIGMA, n0=50, n=n, alpha=alpha,
                       bound=bound, batch_size=n, seed=seed, **sampling)
        radius = cert.radius if radius_fn is None else radius_fn(cert)
        if cert.prediction is not None and (radius > exact or (cert.prediction != truth and radius > 0)):
            violations += 1
    return violations


# Adaptive sampling (smoothcert.adaptive) must pass the very same checks as a fixed n; a
# large tolerance makes the chosen n vary most from run to run.
SAMPLINGS = {"fixed": {}, "adaptive": {"sampling": "adaptive"},
             "adaptive-loose": {"sampling": "adaptive", "tolerance": 0.5},
             # sequential (smoothcert.sequential): a target reached early, and one never reached
             # (every look is taken and the largest radius of all of them is the answer)
             "sequential": {"sampling": "sequential", "target_radius": 0.2 * SIGMA},
             "sequential-far": {"sampling": "sequential", "target_radius": 0.7 * SIGMA}}


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("bound", ["cohen", "two_sided"])
def test_radius_exceeds_exact_distance_at_most_alpha(model, bound, sampling):
    runs, alpha = 1500, 0.1
    violations = certificate_violations(model, bound, runs=runs, n=400, alpha=alpha, distance_in_sigmas=0.6,
                                        **SAMPLINGS[sampling])
    assert_rate_at_most(violations, runs, alpha, f"{bound} ({sampling}) radius above the exact distance")


def test_the_soundness_check_catches_an_unsound_bound(model):
    """The harness has teeth: a radius from the point estimate nA/n (no confidence bound)
    overshoots the exact distance about half the time, and the check says so."""
    runs, alpha = 400, 0.1
    unsound = lambda cert: SIGMA * norm.ppf(min(cert.n_a / cert.n, 1 - 1e-12))  # noqa: E731
    violations = certificate_violations(model, "cohen", runs=runs, n=400, alpha=alpha,
                                        distance_in_sigmas=0.6, radius_fn=unsound)
    assert rate_is_too_high(violations, runs, alpha)


@pytest.mark.parametrize("sampling", ["fixed", "adaptive"])
@pytest.mark.parametrize("bound", ["cohen", "two_sided"])
@pytest.mark.parametrize("distance_in_sigmas", [1.0, -2.0])
def test_large_n_radius_is_close_to_exact(model, bound, distance_in_sigmas, sampling):
    """Adaptive sampling may give up DEFAULT_TOLERANCE·σ of the n_max radius (in expectation)."""
    x = point_at(model, SHAPE, distance_in_sigmas * SIGMA)
    exact = abs(distance_in_sigmas) * SIGMA
    cert = certify(model, x, num_classes=2, sigma=SIGMA, n0=100, n=100_000, alpha=0.001,
                   bound=bound, batch_size=20_000, seed=1, sampling=sampling)
    slack = 0.0 if sampling == "fixed" else DEFAULT_TOLERANCE * SIGMA
    assert cert.prediction == (1 if distance_in_sigmas > 0 else 0)
    assert 0.93 * exact - slack < cert.radius <= exact
    assert cert.n_max == 100_000 and (cert.n == 100_000) == (sampling == "fixed")


@pytest.mark.parametrize("sampling", ["fixed", "adaptive"])
def test_abstains_on_the_boundary(model, sampling):
    x = point_at(model, SHAPE, 0.0)
    cert = certify(model, x, num_classes=2, sigma=SIGMA, n0=100, n=10_000, alpha=0.001, seed=0,
                   sampling=sampling)
    assert cert.abstained and cert.radius == 0.0 and cert.prediction is None


def test_predict_error_rate_at_most_alpha(model):
    """Just off the boundary pA = 0.505: a PREDICT that never abstained would be wrong
    about 40% of the time; a sound one at most α."""
    runs, alpha, n = 1000, 0.1, 1000
    x = point_at(model, SHAPE, float(norm.ppf(0.505)) * SIGMA)
    errors = abstentions = 0
    for seed in range(runs):
        p = predict(model, x, num_classes=2, sigma=SIGMA, n=n, alpha=alpha, batch_size=n, seed=seed)
        errors += p.prediction == 0
        abstentions += p.prediction is None
    assert_rate_at_most(errors, runs, alpha, "PREDICT returned the wrong class")
    assert abstentions > runs // 2  # near the boundary PREDICT mostly abstains


def test_predict_far_from_boundary_answers(model):
    x = point_at(model, SHAPE, -1.5 * SIGMA)
    p = predict(model, x, num_classes=2, sigma=SIGMA, n=1000, alpha=0.001, seed=3)
    assert p.prediction == 0 and p.n1 + p.n2 == 1000 and p.p_value <= 0.001


def test_same_seed_same_certificate(model):
    x = point_at(model, SHAPE, 0.3 * SIGMA)
    kw = dict(num_classes=2, sigma=SIGMA, n0=100, n=5000, alpha=0.001, batch_size=700)
    a, b = certify(model, x, seed=11, **kw), certify(model, x, seed=11, **kw)
    c = certify(model, x, seed=12, **kw)
    assert a.replace(seconds=0) == b.replace(seconds=0)
    assert a.n_a != c.n_a  # a different seed draws different noise


def test_certificate_carries_its_parameters(model):
    x = point_at(model, SHAPE, 1.0 * SIGMA)
    cert = certify(model, x, num_classes=2, sigma=SIGMA, n0=20, n=2000, alpha=0.01,
                   bound="two_sided", batch_size=512, seed=5)
    assert (cert.sigma, cert.n0, cert.n, cert.alpha, cert.batch_size, cert.seed, cert.bound) == (
        SIGMA, 20, 2000, 0.01, 512, 5, "two_sided")
    assert cert.p_b_upper is not None and cert.runner_up == 0
    assert cert.samples == 2020 and cert.seed == 5
    assert certify(model, x, num_classes=2, sigma=SIGMA, n=2000).seed is not None  # drawn, recorded


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=9, alpha=0.001), "n ≥ 10"),
    (dict(n=10, alpha=0.001, bound="two_sided"), "n ≥ 11"),
    (dict(alpha=0.0), "alpha"),
    (dict(alpha=1.0), "alpha"),
    (dict(n0=0), "n0"),
    (dict(sigma=-0.1), "sigma"),
    (dict(sigma=math.nan), "sigma"),
    (dict(bound="drs"), "bound"),
])
def test_certify_rejects_impossible_requests(model, kwargs, message):
    args = dict(num_classes=2, sigma=SIGMA, n0=10, n=100, alpha=0.001) | kwargs
    with pytest.raises(InvalidParameters, match=message):
        certify(model, torch.zeros(SHAPE), **args)


def test_predict_rejects_n_that_always_abstains(model):
    with pytest.raises(InvalidParameters, match="n ≥ 11"):
        predict(model, torch.zeros(SHAPE), num_classes=2, sigma=SIGMA, n=10, alpha=0.001)
    # n = 11 is the smallest that can answer: a unanimous vote passes.
    x = point_at(model, SHAPE, 20 * SIGMA)
    assert predict(model, x, num_classes=2, sigma=SIGMA, n=11, alpha=0.001, seed=0).prediction == 1


def test_smallest_n_can_certify(model):
    x = point_at(model, SHAPE, 20 * SIGMA)
    cert = certify(model, x, num_classes=2, sigma=SIGMA, n0=10, n=10, alpha=0.001, seed=0)
    assert cert.prediction == 1 and cert.radius >= 0
