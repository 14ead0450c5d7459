"""Dual smoothing: the split, and certificates against (d_l + d_r)/√2 (docs/algorithms.md §5, §8)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm

from smoothcert.adaptive import DEFAULT_TOLERANCE
from smoothcert.bounds import InvalidParameters, drs_radius
from smoothcert.drs import certify_drs, merge_checkerboard, split_checkerboard

from .exact import SQRT2, HalfSpace, assert_rate_at_most, point_at, rate_is_too_high

SHAPE, HALF = (2, 4, 6), (2, 4, 3)
SIGMA = 0.3


def test_checkerboard_is_a_disjoint_partition():
    x = torch.arange(2 * 4 * 6).reshape(SHAPE).float()
    left, right = split_checkerboard(x)
    assert left.shape == right.shape == HALF
    assert sorted(torch.cat([left.flatten(), right.flatten()]).tolist()) == x.flatten().tolist()
    # Row 0 keeps even columns in the left half, row 1 odd ones; same mask in every channel.
    assert left[0, 0].tolist() == x[0, 0, ::2].tolist() and left[0, 1].tolist() == x[0, 1, 1::2].tolist()
    assert left[1, 1].tolist() == x[1, 1, 1::2].tolist()
    assert torch.equal(merge_checkerboard(left, right), x)
    batch = torch.stack([x, x + 1])
    assert torch.equal(split_checkerboard(batch)[1][1], right + 1)


def test_odd_width_is_refused():
    with pytest.raises(ValueError, match="even"):
        split_checkerboard(torch.zeros(1, 4, 5))


def halves(seed: int):
    g = torch.Generator().manual_seed(seed)
    left = HalfSpace(torch.randn(24, generator=g), b=0.05).eval()
    right = HalfSpace(torch.randn(24, generator=g), b=-0.02).eval()
    return left, right


def point(left, right, s_left: float, s_right: float) -> torch.Tensor:
    """A full image whose halves lie at signed distances s_left, s_right from their planes."""
    return merge_checkerboard(point_at(left, HALF, s_left, seed=1), point_at(right, HALF, s_right, seed=2))


def drs_violations(s_left: float, s_right: float, runs: int, alpha: float, radius_fn=None, **sampling) -> int:
    """Certificates above the exact radius |s_l + s_r|/√2 of the combined smoothed
    classifier (class 1 iff s_l + s_r > 0). `sampling`: sampling="adaptive" and its tolerance."""
    left, right = halves(0)
    x = point(left, right, s_left * SIGMA, s_right * SIGMA)
    exact = abs(s_left + s_right) * SIGMA / SQRT2
    violations = 0
    for seed in range(runs):
        cert = certify_drs(left, right, x, num_classes=2, sigma=SIGMA, n0=50, n=300,
                           alpha=alpha, batch_size=300, seed=seed, **sampling)
        radius = cert.radius if radius_fn is None else radius_fn(cert)
        if cert.prediction is not None and (radius > exact or cert.prediction != 1):
            violations += 1
    return violations


# Adaptive sampling must pass the same checks; a large tolerance varies the chosen n most.
SAMPLINGS = {"fixed": {}, "adaptive": {"sampling": "adaptive"},
             "adaptive-loose": {"sampling": "adaptive", "tolerance": 0.5},
             # sequential (smoothcert.sequential): a target reached early, and one never reached
             # (every look is taken and the largest radius of all of them is the answer)
             "sequential": {"sampling": "sequential", "target_radius": 0.2 * SIGMA},
             "sequential-far": {"sampling": "sequential", "target_radius": 0.7 * SIGMA}}


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("s_left, s_right", [(0.5, 0.3), (0.6, -0.2)])
def test_drs_radius_exceeds_exact_at_most_alpha(s_left, s_right, sampling):
    """Including when the halves disagree (s_r < 0)."""
    runs, alpha = 1000, 0.1
    violations = drs_violations(s_left, s_right, runs, alpha, **SAMPLINGS[sampling])
    assert_rate_at_most(violations, runs, alpha, f"DRS ({sampling}) radius above (d_l + d_r)/√2")


def test_the_drs_check_catches_the_published_combination():
    """sqrt(R_l² + R_r²) with a negative half-radius clamped to 0 (docs/algorithms.md §5's
    defect) claims far too much when the halves disagree; the same check rejects it."""
    def published(cert):
        r = [max(0.0, SIGMA * float(norm.ppf(p))) for p in cert.p_a_lower_halves]
        return math.hypot(*r)

    runs, alpha = 300, 0.1
    assert rate_is_too_high(drs_violations(0.6, -0.2, runs, alpha, published), runs, alpha)


@pytest.mark.parametrize("sampling", ["fixed", "adaptive"])
def test_drs_large_n_close_to_exact(sampling):
    """Adaptive sampling may give up DEFAULT_TOLERANCE·σ of the n_max radius (in expectation)."""
    left, right = halves(3)
    x = point(left, right, 1.0 * SIGMA, 0.5 * SIGMA)
    cert = certify_drs(left, right, x, num_classes=2, sigma=SIGMA, n=100_000, alpha=0.001,
                       batch_size=25_000, seed=0, sampling=sampling)
    exact = 1.5 * SIGMA / SQRT2
    slack = 0.0 if sampling == "fixed" else DEFAULT_TOLERANCE * SIGMA
    assert cert.prediction == 1 and cert.bound == "drs"
    assert 0.9 * exact - slack < cert.radius <= exact
    assert cert.p_a_lower_halves[0] > cert.p_a_lower_halves[1] and cert.n_a_halves[0] > cert.n_a_halves[1]
    assert cert.n_max == 100_000 and (cert.n == 100_000) == (sampling == "fixed")
    assert sum(cert.n_a_halves) <= 2 * cert.n and cert.samples == 100 + cert.n


@pytest.mark.parametrize("sampling", ["fixed", "adaptive"])
def test_drs_abstains_when_halves_cancel(sampling):
    left, right = halves(4)
    x = point(left, right, 0.4 * SIGMA, -0.4 * SIGMA)
    cert = certify_drs(left, right, x, num_classes=2, sigma=SIGMA, n=20_000, alpha=0.001, seed=0,
                       sampling=sampling)
    assert cert.abstained and cert.radius == 0.0


def test_drs_radius_formula_never_clamps_a_negative_half():
    # a = Φ⁻¹(0.99) ≈ 2.33, b = Φ⁻¹(0.2) ≈ −0.84: R = σ/√2·(a+b), smaller than from a alone.
    r = drs_radius(1.0, 0.99, 0.2)
    assert r == pytest.approx((2.3263 - 0.8416) / SQRT2, abs=1e-3)
    assert drs_radius(1.0, 0.7, 0.3) is None  # a + b = 0 abstains
    assert drs_radius(1.0, 0.0, 0.999) is None  # a = −∞


def test_drs_needs_n_for_two_half_bounds():
    left, right = halves(0)
    with pytest.raises(InvalidParameters, match="n ≥ 11"):
        certify_drs(left, right, torch.zeros(SHAPE), num_classes=2, sigma=SIGMA, n=10, alpha=0.001)
