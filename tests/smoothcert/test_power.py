"""Each α split, checked where it matters, with the power of the check computed.

A certificate's radius is only as good as its confidence bounds, and each split of α
(docs/algorithms.md §1, §2, §5) exists so that all of a certificate's bounds hold at once
with probability ≥ 1 − α. These tests check exactly that joint validity against models whose
class probabilities are exact, and run the same check on a deliberately unsound variant of
each: its failure rate is computed exactly here (binomial sums over the same thresholds), so
the probability that the check catches it (`exact.power`) is a number each test asserts
before it runs, not a hope.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, multinomial, norm

from smoothcert import bounds
from smoothcert.drs import certify_drs, merge_checkerboard
from smoothcert.smoothing import certify

from .exact import HalfSpace, Strips, assert_rate_at_most, first_k, half_failure, point_at, power, rate_is_too_high

SHAPE = (1, 4, 4)
SIGMA = 0.25
ALPHA = 0.1
MIN_POWER = 0.99


# --- two-sided: pB_up must bound the largest other class, not the selection's runner-up --------


@pytest.fixture(scope="module")
def strips() -> tuple[Strips, torch.Tensor, list[float]]:
    """Three classes along one direction, at a point where class 0 leads (p ≈ 0.50) and
    classes 1 and 2 are close (≈ 0.26 and 0.24): a 20-vote selection sample often names
    class 2 as the runner-up although class 1 is the larger."""
    model = Strips(torch.linspace(-1.0, 1.0, 16), edges=[0.0, 0.177]).eval()
    x = model.point_at(SHAPE, projection=0.0)
    return model, x, model.probabilities(x, SIGMA)


def two_sided_runs(model, x, runs: int, n0: int, n: int):
    """(certificate, selection counts, estimation counts) of `runs` two-sided CERTIFY runs,
    the counts recorded by wrapping the sampler (the certificate itself is untouched)."""
    import smoothcert.smoothing as smoothing

    seen: list[np.ndarray] = []
    real = smoothing.sample_counts_multi

    def recording(*args, **kwargs):
        counts = real(*args, **kwargs)
        seen.append(counts[0].copy())
        return counts

    out = []
    smoothing.sample_counts_multi = recording
    try:
        for seed in range(runs):
            seen.clear()
            cert = certify(model, x, num_classes=3, sigma=SIGMA, n0=n0, n=n, alpha=ALPHA, bound="two_sided",
                           batch_size=n, seed=seed)
            out.append((cert, seen[0], seen[1]))
    finally:
        smoothing.sample_counts_multi = real
    return out


def two_sided_fails(c_a: int, p_a_lower: float, p_b_upper: float, probabilities) -> bool:
    # The joint claim about cA (chosen by the selection): pA ≥ pA_low and every other class ≤ pB_up.
    rivals = max(p for c, p in enumerate(probabilities) if c != c_a)
    return p_a_lower > probabilities[c_a] or p_b_upper < rivals


def selection_variant_rate(probabilities, n0: int, n: int, tail: float) -> float:
    """The exact failure rate of `selection_runner_up_only`: over every selection outcome
    (cA and the selection's runner-up), the chance that the estimation counts break pA_low or
    the runner-up-only bound."""
    p = np.asarray(probabilities)
    total = 0.0
    for a in range(n0 + 1):
        for b in range(n0 + 1 - a):
            counts0 = [a, b, n0 - a - b]
            weight = multinomial.pmf(counts0, n0, p)
            c_a = int(np.argmax(counts0))
            others = [c for c in range(3) if c != c_a]
            c_b = max(others, key=lambda c: (counts0[c], -c))
            rivals = max(p[c] for c in others)
            # pA_low fails from kA votes on; the runner-up bound fails up to kB votes.
            k_a = first_k(n, lambda k, p_a=p[c_a]: bounds.round_down(bounds.cp_lower(k, n, ALPHA / 2) - tail) > p_a)
            k_b = first_k(n, lambda k, r=rivals: bounds.round_up(bounds.cp_upper(k, n, ALPHA / 2) + tail) >= r) - 1
            # kA ~ Bin(n, pA); given kA, the runner-up's votes ~ Bin(n − kA, p_cB / (1 − pA)).
            kas = np.arange(n + 1)
            given = binom.cdf(k_b, n - kas, p[c_b] / (1 - p[c_a]))
            fail = np.where(kas >= k_a, 1.0, given)
            total += weight * float((binom.pmf(kas, n, p[c_a]) * fail).sum())
    return total


def test_two_sided_bounds_every_other_class_and_the_check_catches_the_selection_runner_up(strips):
    model, x, probabilities = strips
    runs, n0, n = 1000, 20, 2000
    results = two_sided_runs(model, x, runs, n0, n)
    selected = [int(np.argmax(c0)) for _, c0, _ in results]
    assert all(int(c[a]) == cert.n_a for (cert, _, c), a in zip(results, selected, strict=True))  # the draws seen
    sound = sum(two_sided_fails(a, cert.p_a_lower, cert.p_b_upper, probabilities)
                for (cert, _, _), a in zip(results, selected, strict=True))
    assert_rate_at_most(sound, runs, ALPHA, "two-sided bounds (pA_low, pB_up over every other class)")

    # UNSOUND: pB_up bounds only the class that was runner-up in the selection sample.
    rate = selection_variant_rate(probabilities, n0, n, results[0][0].noise_tail)
    assert rate > 2 * ALPHA and power(rate, runs, ALPHA) > MIN_POWER, rate
    unsound = 0
    for (cert, counts0, counts), c_a in zip(results, selected, strict=True):
        c_b = max((c for c in range(3) if c != c_a), key=lambda c: (counts0[c], -c))
        p_b = bounds.round_up(bounds.cp_upper(int(counts[c_b]), n, ALPHA / 2) + cert.noise_tail)
        unsound += two_sided_fails(c_a, cert.p_a_lower, p_b, probabilities)
    assert rate_is_too_high(unsound, runs, ALPHA), (unsound, runs, rate)


# --- DRS: each half's bound at α/2 -------------------------------------------------------------


HALF = (1, 4, 2)


def drs_point(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    left = HalfSpace(torch.randn(8, generator=g), b=0.05).eval()
    right = HalfSpace(torch.randn(8, generator=g), b=-0.02).eval()
    s_left, s_right = 0.5 * SIGMA, 0.4 * SIGMA
    x = merge_checkerboard(point_at(left, HALF, s_left, seed=1), point_at(right, HALF, s_right, seed=2))
    return left, right, x, (float(norm.cdf(s_left / SIGMA)), float(norm.cdf(s_right / SIGMA)))


def test_drs_bounds_each_half_at_half_alpha_and_the_check_catches_the_full_alpha():
    left, right, x, (p_left, p_right) = drs_point()
    runs, n = 1000, 300
    certs = [certify_drs(left, right, x, num_classes=2, sigma=SIGMA, n0=50, n=n, alpha=ALPHA, batch_size=n,
                         seed=seed) for seed in range(runs)]
    assert all(c.prediction == 1 for c in certs)  # n0 = 50 at these distances: cA is right
    sound = sum(c.p_a_lower_halves[0] > p_left or c.p_a_lower_halves[1] > p_right for c in certs)
    assert_rate_at_most(sound, runs, ALPHA, "DRS half bounds at α/2")

    # UNSOUND (the published code): the full α on each half. The halves see disjoint noise,
    # so their failures are independent and the variant fails at 1 − (1 − f_l)(1 − f_r).
    tail = certs[0].noise_tail
    f_l, f_r = half_failure(n, ALPHA, p_left, tail), half_failure(n, ALPHA, p_right, tail)
    rate = 1 - (1 - f_l) * (1 - f_r)
    assert power(rate, runs, ALPHA) > MIN_POWER, rate

    def full_alpha(k: int) -> float:
        return bounds.round_down(bounds.cp_lower(k, n, ALPHA) - tail)

    unsound = sum(full_alpha(c.n_a_halves[0]) > p_left or full_alpha(c.n_a_halves[1]) > p_right for c in certs)
    assert rate_is_too_high(unsound, runs, ALPHA), (unsound, runs)


# --- fixed n: the selection votes never enter the estimate -------------------------------------


def test_fixed_n_never_reuses_the_selection_votes_and_the_check_catches_reuse():
    """On the boundary (p = 1/2 for both classes) the selection sample names either class:
    it is "wrong" about half the time, and the class it names has at least half its votes by
    construction. Pooling those votes into the estimate biases pA_low upwards."""
    model = HalfSpace(torch.linspace(-1.0, 1.5, 16), b=-0.1).eval()
    x = point_at(model, SHAPE, 0.0)
    p_one = float(norm.cdf(float(model.signed_distance(x.unsqueeze(0))) / SIGMA))
    truth = (1 - p_one, p_one)
    runs, n0, n = 2000, 100, 100
    sound = unsound = 0
    tail = None
    for seed in range(runs):
        cert = certify(model, x, num_classes=2, sigma=SIGMA, n0=n0, n=n, alpha=ALPHA, batch_size=200, seed=seed)
        counts0, counts = _votes(model, x, n0, n, seed)
        c_a, tail = int(np.argmax(counts0)), cert.noise_tail
        assert int(counts[c_a]) == cert.n_a  # the draws certify made
        sound += cert.p_a_lower > truth[c_a]
        # UNSOUND: pA_low from the selection's votes for cA plus the estimation's, over n0 + n.
        pooled = bounds.round_down(bounds.cp_lower(int(counts0[c_a] + counts[c_a]), n0 + n, ALPHA) - tail)
        unsound += pooled > truth[c_a]
    assert_rate_at_most(sound, runs, ALPHA, "fixed-n pA_low on the boundary")
    threshold = first_k(n0 + n, lambda k: bounds.round_down(bounds.cp_lower(k, n0 + n, ALPHA) - tail) > 0.5)
    ks = np.arange(n0 + 1)
    k_selected = np.maximum(ks, n0 - ks)  # the selection names its majority (either class: p = 1/2)
    rate = float((binom.pmf(ks, n0, 0.5) * binom.sf(threshold - k_selected - 1, n, 0.5)).sum())
    assert power(rate, runs, ALPHA) > MIN_POWER, rate
    assert rate_is_too_high(unsound, runs, ALPHA), (unsound, runs, rate)


def _votes(model, x, n0: int, n: int, seed: int):
    # The same draws certify makes: one generator, the selection batch, then the estimation.
    from smoothcert.sampling import make_generator, sample_counts

    g = make_generator(seed, "cpu")
    counts0 = sample_counts(model, x, SIGMA, n0, num_classes=2, batch_size=200, generator=g)
    return counts0, sample_counts(model, x, SIGMA, n, num_classes=2, batch_size=200, generator=g)


def test_the_power_helper_agrees_with_simulation():
    """`power` is what the tests above lean on: against 20,000 simulated checks it is right."""
    rng = np.random.default_rng(0)
    runs, rate, variant = 500, 0.1, 0.15
    simulated = np.mean([rate_is_too_high(int(k), runs, rate) for k in rng.binomial(runs, variant, 20_000)])
    assert math.isclose(simulated, power(variant, runs, rate), abs_tol=0.01)
