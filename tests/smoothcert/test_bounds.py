"""Confidence bounds and feasibility checks, against independent computations."""

from __future__ import annotations

import math

import mpmath
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


# (k, n, α) from the ordinary to the extreme: unanimous votes and one dissent with n up to 10⁹,
# a bare majority up to 10⁴, α from 1e-12 to 1 − 1e-12.
EXTREMES = [(k, n, a) for n in (10, 1000, 10_000, 10**7, 10**9) for k in (n, n - 1, n // 2 + 1)
            for a in (1e-12, 1e-3, 0.05, 0.5, 1 - 1e-12) if k > 0 and (k >= n - 1 or n <= 1000)]


def exact_lower(k: int, n: int, alpha: float) -> mpmath.mpf:
    """The Clopper–Pearson lower bound at 60 digits: the p with P(Bin(n, p) ≥ k) = α, in
    closed form for k ∈ {1, n}, else by bisection on P (k = n − 1 in closed form, the
    regularised incomplete beta otherwise) inside a bracket around SciPy's value."""
    with mpmath.workdps(60):
        a, one = mpmath.mpf(alpha), mpmath.mpf(1)
        if k == n:
            return a ** (one / n)
        if k == 1:
            return 1 - (1 - a) ** (one / n)

        def tail(p):  # P(Bin(n, p) ≥ k), increasing in p
            if k == n - 1:
                return p ** n + n * p ** (n - 1) * (1 - p)
            return mpmath.betainc(k, n - k + 1, 0, p, regularized=True)

        guess = mpmath.mpf(float(bounds.beta.ppf(alpha, k, n - k + 1)))
        lo, hi = guess * (1 - mpmath.mpf(10) ** -6), min(one, guess * (1 + mpmath.mpf(10) ** -6))
        assert tail(lo) < a <= tail(hi), "the bracket misses the root"
        for _ in range(75):  # 1e-6 · 2⁻⁷⁵: far inside the 2⁻⁴⁰ margin checked
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if tail(mid) < a else (lo, mid)
        return lo


def exact_upper(k: int, n: int, alpha: float) -> mpmath.mpf:
    with mpmath.workdps(60):
        return 1 - exact_lower(n - k, n, alpha)  # P(Bin(n, p) ≤ k) = α  ⇔  the lower bound of n − k failures


def test_clopper_pearson_is_rounded_in_the_safe_direction():
    """Against 60-digit roots of the defining equation, at every extreme: the lower bound is
    never above its exact value (nor ever 1), the upper bound never below. The same check
    catches a bound rounded the other way by the same margin, so it can tell."""
    unsafe = 0
    for k, n, alpha in EXTREMES:
        low = bounds.cp_lower(k, n, alpha)
        exact = exact_lower(k, n, alpha)
        assert mpmath.mpf(low) <= exact and low < 1.0, (k, n, alpha, low, exact)
        unsafe += mpmath.mpf(min(1.0, low * (1 + 2 * bounds.SAFETY))) > exact
        if k < n:
            assert mpmath.mpf(bounds.cp_upper(k, n, alpha)) >= exact_upper(k, n, alpha), (k, n, alpha)
    assert unsafe > len(EXTREMES) // 2


def test_radii_are_finite_even_when_every_vote_agrees_and_alpha_is_near_one():
    """α = 1 − 1e-12 and all n votes for one class: the lower bound rounds to 1 in float64, yet
    the certificate's bound stays below 1 and every radius is a finite number."""
    for n in (10, 10**4, 10**7, 10**9):
        p = bounds.cohen_bound(n, n, 1 - 1e-12)
        assert p < 1.0 and math.isfinite(bounds.cohen_radius(0.25, p))
        p_a, p_b, _ = bounds.two_sided_bound([n, 0, 0], 0, 1 - 1e-12)
        assert math.isfinite(bounds.two_sided_radius(0.25, p_a, p_b))
        assert math.isfinite(bounds.drs_radius(0.25, *bounds.drs_bounds(n, n, n, 1 - 1e-12)))
    assert bounds.cohen_radius(0.25, 1.0) is None and bounds.drs_radius(0.25, 1.0, 0.9) is None


def test_the_noise_tail_lowers_lower_bounds_and_raises_upper_bounds():
    tail = 1e-4
    assert bounds.cohen_bound(950, 1000, 0.001, tail) < bounds.cohen_bound(950, 1000, 0.001) - tail * 0.999
    p_a, p_b, _ = bounds.two_sided_bound([700, 300], 0, 0.01, tail)
    p_a0, p_b0, _ = bounds.two_sided_bound([700, 300], 0, 0.01)
    assert p_a <= p_a0 - tail and p_b >= p_b0 + tail
    assert all(h <= h0 - tail for h, h0 in zip(bounds.drs_bounds(900, 800, 1000, 0.01, tail),
                                                bounds.drs_bounds(900, 800, 1000, 0.01), strict=True))
    # Feasibility counts the tail: a certificate needs more votes.
    assert bounds.min_certify_n(0.001, "cohen", 0.01) > bounds.min_certify_n(0.001)


def test_minimum_sample_sizes():
    assert bounds.min_certify_n(0.001) == 10
    assert bounds.min_certify_n(0.001, "two_sided") == bounds.min_certify_n(0.001, "drs") == 11
    assert bounds.min_predict_n(0.001) == 11
    # Strict for cohen too: at α = 2⁻¹⁰, n = 10 unanimous votes give pA_low = 1/2 exactly,
    # which could only ever certify radius 0; likewise α = 0.5 at n = 1.
    assert bounds.min_certify_n(2.0 ** -10) == 11
    assert bounds.min_certify_n(0.5) == 2 and bounds.min_predict_n(0.5) == 2  # 2·0.5² = 0.5
    with pytest.raises(bounds.InvalidParameters, match="use n ≥ 11"):
        bounds.check_certify(10, 10, 2.0 ** -10, None)
    for alpha in (0.1, 0.01, 1e-6):
        n = bounds.min_certify_n(alpha)
        assert bounds.cp_lower(n, n, alpha) > 0.5 >= bounds.cp_lower(n - 1, n - 1, alpha)


def test_two_sided_bounds_every_other_class():
    """pB_up must cover the largest class other than cA, whatever the selection sample's
    runner-up was: the largest of every other class's bound at α/2 (test_power.py shows why one
    α/2 suffices, and catches a bound on the selection's runner-up alone)."""
    counts = [700, 100, 190, 10]
    p_a, p_b, c_b = bounds.two_sided_bound(counts, 0, alpha=0.01)
    assert c_b == 2
    assert p_b == bounds.cp_upper(190, 1000, 0.005)
    assert p_a == bounds.cp_lower(700, 1000, 0.005)
    assert bounds.two_sided_bound([900, 100], 0, 0.01)[1] == bounds.cp_upper(100, 1000, 0.005)


def test_radii():
    assert bounds.cohen_radius(0.5, 0.4) is None
    assert bounds.cohen_radius(0.5, 0.5) is None  # strictly above 1/2, or no certificate
    assert bounds.two_sided_radius(1.0, 0.6, 0.6) is None
    assert bounds.two_sided_radius(2.0, 0.8, 0.2) == pytest.approx(2 * 0.8416212, rel=1e-6)
    assert bounds.drs_radius(1.0, 0.6, 0.4) is None  # a + b = 0 exactly: abstain


def test_radii_are_rounded_down():
    """Each radius is at most its exact value (60 digits), the rounding of Φ⁻¹ included."""
    with mpmath.workdps(60):
        for p in (0.5000001, 0.6, 0.9, 0.999, 1 - 1e-9):
            exact = 0.3 * mpmath.sqrt(2) * mpmath.erfinv(2 * mpmath.mpf(p) - 1)
            assert mpmath.mpf(bounds.cohen_radius(0.3, p)) <= exact
            exact2 = 0.3 / 2 * mpmath.sqrt(2) * (mpmath.erfinv(2 * mpmath.mpf(p) - 1)
                                                 - mpmath.erfinv(2 * mpmath.mpf(0.4) - 1))
            assert mpmath.mpf(bounds.two_sided_radius(0.3, p, 0.4)) <= exact2


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
