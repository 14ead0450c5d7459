"""Adaptive sampling (smoothcert.adaptive, docs/algorithms.md §7): the plan, what a certificate
records, and soundness against exact answers, including unsound variants the check catches.

The exact-answer checks of test_smoothing.py and test_drs.py also run with
sampling="adaptive" (their SAMPLINGS parameter); this file adds what only adaptive sampling has.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from smoothcert import adaptive
from smoothcert.adaptive import DEFAULT_TOLERANCE, check_sampling, ladder, plan
from smoothcert.bounds import InvalidParameters, cohen_bound, cohen_radius, cp_lower, min_certify_n
from smoothcert.drs import certify_drs
from smoothcert.sampling import make_generator, sample_counts
from smoothcert.smoothing import certify

from .exact import HalfSpace, assert_rate_at_most, point_at, rate_is_too_high

SHAPE = (1, 4, 4)
SIGMA = 0.25


@pytest.fixture(scope="module")
def model() -> HalfSpace:
    return HalfSpace(torch.linspace(-1.0, 1.5, 16), b=-0.1).eval()


# --- the plan -------------------------------------------------------------------------------


def test_ladder_is_fixed_ascending_and_ends_at_n_max():
    rungs = ladder(100_000, 10)
    assert rungs[0] == 0 and rungs[-1] == 100_000 and rungs[1] >= 10
    assert list(rungs) == sorted(set(rungs))
    steps = [b / a for a, b in zip(rungs[1:-1], rungs[2:], strict=True) if a >= 100]
    assert max(steps) < 1.2  # a rung overshoots the n it needs by less than 20%
    assert ladder(10, 10) == (0, 10)


@pytest.mark.parametrize("sampling, tolerance, expected", [
    ("fixed", None, None), ("adaptive", None, DEFAULT_TOLERANCE), ("adaptive", 0, 0.0),
    ("adaptive", 0.2, 0.2), ("adaptive", adaptive.MAX_TOLERANCE, adaptive.MAX_TOLERANCE),
])
def test_check_sampling_fills_the_default(sampling, tolerance, expected):
    assert check_sampling(sampling, tolerance) == expected


@pytest.mark.parametrize("sampling, tolerance, message", [
    ("online", None, "sampling must be one of fixed, adaptive, sequential"),
    ("sequential", 0.1, "tolerance applies to sampling 'adaptive' only"),
    ("fixed", 0.1, "tolerance applies to sampling 'adaptive' only"),
    ("adaptive", -0.01, "tolerance"), ("adaptive", math.nan, "tolerance"), ("adaptive", math.inf, "tolerance"),
    ("adaptive", 5.0, "tolerance"), ("adaptive", True, "tolerance"), ("adaptive", "0.1", "tolerance"),
])
def test_check_sampling_refuses(sampling, tolerance, message):
    with pytest.raises(InvalidParameters, match=message):
        check_sampling(sampling, tolerance)


PILOTS = {  # bound → selection counts (one vector per network) with cA = class 0
    "cohen": [[[k, 100 - k]] for k in (50, 55, 60, 75, 90, 97, 99, 100)] + [[[45, 30, 25]]],
    "two_sided": [[[k, 100 - k - r, r]] for k, r in ((60, 10), (80, 5), (95, 1), (100, 0))],
    "drs": [[[k, 100 - k], [m, 100 - m]] for k, m in ((60, 55), (90, 70), (100, 100), (99, 40))],
}
TOLERANCES = (0.0, 0.01, 0.05, 0.2, 1.0, adaptive.MAX_TOLERANCE)


@pytest.mark.parametrize("bound", PILOTS)
@pytest.mark.parametrize("n_max", [400, 100_000])
def test_n_is_a_rung_at_most_n_max_and_never_grows_with_the_tolerance(bound, n_max):
    alpha = 0.001
    rungs = ladder(n_max, min_certify_n(alpha, bound))
    for counts0 in PILOTS[bound]:
        sizes = [plan(bound, 0, counts0, n_max=n_max, alpha=alpha, tolerance=t).n for t in TOLERANCES]
        assert all(n in rungs and n <= n_max for n in sizes), (counts0, sizes)
        assert sizes == sorted(sizes, reverse=True), (counts0, sizes)


def test_the_plan_meets_its_two_conditions_at_the_smallest_rung():
    p = plan("cohen", 0, [[90, 10]], n_max=100_000, alpha=0.001, tolerance=0.05)
    assert p.expected_margin >= p.expected_margin_max - 0.05
    assert p.abstain_probability <= p.abstain_probability_max + adaptive.ABSTENTION_SLACK
    rungs = ladder(100_000, 10)
    below = plan("cohen", 0, [[90, 10]], n_max=rungs[rungs.index(p.n) - 1], alpha=0.001, tolerance=0.0)
    # the rung below fails a condition (its own expected margin and abstention, as an n_max)
    assert below.expected_margin_max < p.expected_margin_max - 0.05 or \
        below.abstain_probability_max > p.abstain_probability_max + adaptive.ABSTENTION_SLACK
    assert 1_000 < p.n < 100_000


def test_a_unanimous_selection_sample_needs_many_samples():
    """100 of 100 votes cannot tell pA = 0.99 from 0.99999, and only n_max reaches the n_max
    radius of the latter: the posterior average keeps n large."""
    unanimous = plan("cohen", 0, [[100, 0]], n_max=100_000, alpha=0.001, tolerance=DEFAULT_TOLERANCE).n
    ninety = plan("cohen", 0, [[90, 10]], n_max=100_000, alpha=0.001, tolerance=DEFAULT_TOLERANCE).n
    assert unanimous >= 25_000 and unanimous > 3 * ninety


def test_early_abstention_only_when_n_max_would_almost_surely_abstain():
    # The top class has ~35% of the votes: n_max would almost surely abstain, whatever the tolerance.
    assert plan("cohen", 0, [[35, 33, 32]], n_max=100_000, alpha=0.001, tolerance=0.0).n == 0
    # With 45% it might still certify (P(pA > 1/2) ≈ 14% under the posterior): no early abstention.
    assert plan("cohen", 0, [[45, 30, 25]], n_max=100_000, alpha=0.001, tolerance=1.0).n > 0
    # A near tie might still certify at n_max: no early abstention, however loose the tolerance.
    for counts0 in ([[55, 45]], [[52, 48]]):
        assert plan("cohen", 0, counts0, n_max=100_000, alpha=0.001, tolerance=adaptive.MAX_TOLERANCE).n > 0
    # DRS abstains when the halves' bounds sum below 1: here about 0.40 + 0.35.
    assert plan("drs", 0, [[40, 30, 30], [35, 40, 25]], n_max=10_000, alpha=0.001, tolerance=0.05).n == 0


# --- certificates ---------------------------------------------------------------------------


def test_the_certificate_records_sampling_tolerance_and_n(model):
    x = point_at(model, SHAPE, 1.0 * SIGMA)
    kw = dict(num_classes=2, sigma=SIGMA, n0=100, n=20_000, alpha=0.001, batch_size=5000, seed=3)
    fixed = certify(model, x, **kw)
    assert (fixed.sampling, fixed.n, fixed.n_max, fixed.tolerance) == ("fixed", 20_000, 20_000, None)
    a = certify(model, x, sampling="adaptive", **kw)
    assert (a.sampling, a.n_max, a.tolerance) == ("adaptive", 20_000, DEFAULT_TOLERANCE)
    assert 0 < a.n < a.n_max and a.samples == 100 + a.n and a.n_a <= a.n
    assert a.p_a_lower == cohen_bound(a.n_a, a.n, 0.001, a.noise_tail)  # the ordinary bound at the chosen n
    assert certify(model, x, sampling="adaptive", **kw).replace(seconds=0) == a.replace(seconds=0)
    loose = certify(model, x, sampling="adaptive", tolerance=0.5, **kw)
    assert loose.n <= a.n and loose.tolerance == 0.5
    with pytest.raises(InvalidParameters, match="tolerance"):
        certify(model, x, tolerance=0.1, **kw)


class Thirds(nn.Module):
    """Three classes by the value of u·x: at x = 0 with σ = 1, u·(x + ε) ~ N(0, 1), so the
    classes have probabilities 0.4, 0.3, 0.3 exactly and no certificate is possible."""

    def __init__(self):
        super().__init__()
        self.register_buffer("u", torch.full((16,), 0.25))
        self.cuts = torch.tensor([norm.ppf(0.4), norm.ppf(0.7)], dtype=torch.float32)

    def forward(self, x):
        z = x.flatten(1) @ self.u
        return nn.functional.one_hot(torch.bucketize(z, self.cuts), 3).float()


def test_early_abstention_draws_no_estimation_sample():
    x = torch.zeros(SHAPE)
    kw = dict(num_classes=3, sigma=1.0, n0=200, n=100_000, alpha=0.001, batch_size=20_000, seed=0)
    cert = certify(Thirds(), x, sampling="adaptive", **kw)
    assert cert.abstained and cert.radius == 0.0 and cert.n == 0 and cert.n_a == 0
    assert cert.samples == 200 and cert.n_max == 100_000
    assert certify(Thirds(), x, **kw).abstained  # n_max abstains too


def test_drs_records_the_adaptive_n():
    g = torch.Generator().manual_seed(0)
    left, right = HalfSpace(torch.randn(24, generator=g), 0.05), HalfSpace(torch.randn(24, generator=g), -0.02)
    x = torch.rand((2, 4, 6), generator=g)
    cert = certify_drs(left, right, x, num_classes=2, sigma=0.3, n=20_000, seed=1, sampling="adaptive")
    assert cert.sampling == "adaptive" and cert.n_max == 20_000 and cert.n <= 20_000
    assert cert.samples == 100 + cert.n and max(cert.n_a_halves) <= cert.n


# --- the soundness check catches unsound adaptive variants ------------------------------------


def pooled(model, x, *, n0, n_max, alpha, tolerance, seed):
    """UNSOUND (what the ISS authors' script does): the selection counts, which chose cA and
    n, are added to the estimate."""
    g = make_generator(seed, "cpu")
    counts0 = sample_counts(model, x, SIGMA, n0, num_classes=2, batch_size=n_max, generator=g)
    c_a = int(np.argmax(counts0))
    n = plan("cohen", c_a, [counts0], n_max=n_max, alpha=alpha, tolerance=tolerance).n
    counts = sample_counts(model, x, SIGMA, n, num_classes=2, batch_size=n_max, generator=g)
    return c_a, cohen_radius(SIGMA, cp_lower(int(counts0[c_a] + counts[c_a]), n0 + n, alpha))


def peeking(model, x, *, n0, n_max, alpha, tolerance, seed):
    """UNSOUND: draws the estimation sample rung by rung, recomputes the fixed-n bound at
    every rung and keeps the best radius (optional stopping)."""
    g = make_generator(seed, "cpu")
    counts0 = sample_counts(model, x, SIGMA, n0, num_classes=2, batch_size=n_max, generator=g)
    c_a = int(np.argmax(counts0))
    best, n_a, drawn = None, 0, 0
    for rung in ladder(n_max, min_certify_n(alpha))[1:]:
        n_a += int(sample_counts(model, x, SIGMA, rung - drawn, num_classes=2, batch_size=n_max, generator=g)[c_a])
        drawn = rung
        radius = cohen_radius(SIGMA, cp_lower(n_a, drawn, alpha))
        if radius is not None and (best is None or radius > best):
            best = radius
    return c_a, best


def sound(model, x, *, n0, n_max, alpha, tolerance, seed):
    cert = certify(model, x, num_classes=2, sigma=SIGMA, n0=n0, n=n_max, alpha=alpha, batch_size=n_max,
                   seed=seed, sampling="adaptive", tolerance=tolerance)
    return cert.prediction, None if cert.abstained else cert.radius


def violations(variant, model, distance_in_sigmas: float, runs: int, **kw) -> int:
    """Answers that claim a radius above the exact one (or a wrong class with a radius)."""
    x = point_at(model, SHAPE, distance_in_sigmas * SIGMA)
    exact = abs(float(model.signed_distance(x.unsqueeze(0))))
    truth = 1 if distance_in_sigmas > 0 else 0
    count = 0
    for seed in range(runs):
        c_a, radius = variant(model, x, seed=seed, **kw)
        count += radius is not None and (radius > exact or (c_a != truth and radius > 0))
    return count


def test_the_check_catches_selection_counts_in_the_estimate(model):
    """On the boundary the selected class has ≥ half the selection votes by construction;
    pooling them in certifies a radius > 0 (false: the exact radius is 0) too often."""
    runs, kw = 1000, dict(n0=100, n_max=400, alpha=0.1, tolerance=0.5)
    assert_rate_at_most(violations(sound, model, 0.0, runs, **kw), runs, 0.1, "adaptive CERTIFY")
    assert rate_is_too_high(violations(pooled, model, 0.0, runs, **kw), runs, 0.1)


def test_the_check_catches_a_bound_recomputed_after_peeking(model):
    runs, kw = 400, dict(n0=50, n_max=400, alpha=0.1, tolerance=0.5)
    assert_rate_at_most(violations(sound, model, 0.6, runs, **kw), runs, 0.1, "adaptive CERTIFY")
    assert rate_is_too_high(violations(peeking, model, 0.6, runs, **kw), runs, 0.1)
