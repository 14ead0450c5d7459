"""Confidence bounds and feasibility checks, against independent computations."""

from __future__ import annotations

import pytest
from scipy.stats import binom

from smoothcert import bounds


@pytest.mark.parametrize("k, n, alpha", [(1, 10, 0.05), (93, 100, 0.001), (99_000, 100_000, 0.001), (5, 7, 0.3)])
def test_clopper_pearson_matches_its_definition(k, n, alpha):
    # The lower bound p solves P(Bin(n, p) ≥ k) = α; the upper bound P(Bin(n, p) ≤ k) = α.
    low, high = bounds.cp_lower(k, n, alpha), bounds.cp_upper(k, n, alpha)
    assert binom.sf(k - 1, n, low) == pytest.approx(alpha, rel=1e-6)
    assert binom.cdf(k, n, high) == pytest.approx(alpha, rel=1e-6)
    assert low < k / n < high


def test_clopper_pearson_edges():
    assert bounds.cp_lower(0, 10, 0.01) == 0.0 and bounds.cp_upper(10, 10, 0.01) == 1.0
    assert bounds.cp_lower(10, 10, 0.001) == pytest.approx(0.001 ** (1 / 10))


def test_minimum_sample_sizes():
    assert bounds.min_certify_n(0.001) == 10
    assert bounds.min_certify_n(0.001, "two_sided") == bounds.min_certify_n(0.001, "drs") == 11
    assert bounds.min_predict_n(0.001) == 11
    assert bounds.min_certify_n(0.5) == 1 and bounds.min_predict_n(0.5) == 2  # 2·0.5² = 0.5
    for alpha in (0.1, 0.01, 1e-6):
        n = bounds.min_certify_n(alpha)
        assert bounds.cp_lower(n, n, alpha) >= 0.5 > bounds.cp_lower(n - 1, n - 1, alpha)


def test_two_sided_bounds_every_other_class():
    """pB_up must cover the largest class other than cA, whatever the selection sample's
    runner-up was, so the α/2 is split over the K−1 other classes."""
    counts = [700, 100, 190, 10]
    p_a, p_b, c_b = bounds.two_sided_bound(counts, 0, alpha=0.01)
    assert c_b == 2
    assert p_b == bounds.cp_upper(190, 1000, 0.01 / 2 / 3)
    assert p_a == bounds.cp_lower(700, 1000, 0.005)
    # Binary: exactly one bound at α/2.
    assert bounds.two_sided_bound([900, 100], 0, 0.01)[1] == bounds.cp_upper(100, 1000, 0.005)


def test_radii():
    assert bounds.cohen_radius(0.5, 0.4) is None
    assert bounds.cohen_radius(0.5, 0.5) == 0.0
    assert bounds.two_sided_radius(1.0, 0.6, 0.6) is None
    assert bounds.two_sided_radius(2.0, 0.8, 0.2) == pytest.approx(2 * 0.8416212, rel=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda: bounds.check_certify(100, 1000, 0.001, 0), "batch_size"),
    (lambda: bounds.check_certify(100, 1000, 1.5, 10), "alpha"),
    (lambda: bounds.check_certify(100, 1000.0, 0.001, 10), "n must be an integer"),
    (lambda: bounds.check_certify(100, True, 0.001, 10), "n must be an integer"),
    (lambda: bounds.check_certify(100, 1000, 0.001, 10, "exact"), "bound"),
    (lambda: bounds.check_sigma(2.0, 0.05, 1.0), "outside the model's range"),
    (lambda: bounds.check_predict(5, 0.001, 10), "always abstain"),
])
def test_invalid_parameters_say_why(call, message):
    with pytest.raises(bounds.InvalidParameters, match=message):
        call()
