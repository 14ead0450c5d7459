"""Sequential sampling toward a target radius (smoothcert.sequential, docs/algorithms.md §7): the
schedule of looks, what a certificate records, when it stops, and soundness against exact
answers, including the peeking variant the check catches.

The exact-answer checks of test_smoothing.py and test_drs.py also run with
sampling="sequential" (their SAMPLINGS parameter); this file adds what only it has.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from smoothcert import sequential
from smoothcert.bounds import InvalidParameters, cohen_bound, cohen_radius, cp_lower
from smoothcert.drs import certify_drs
from smoothcert.sampling import make_generator, sample_counts
from smoothcert.sequential import FINAL_SHARE, FIRST_LOOK, check_target, futile, schedule
from smoothcert.smoothing import certify

from .exact import HalfSpace, assert_rate_at_most, point_at, rate_is_too_high
from .test_adaptive import Thirds

SHAPE = (1, 4, 4)
SIGMA = 0.25


@pytest.fixture(scope="module")
def model() -> HalfSpace:
    return HalfSpace(torch.linspace(-1.0, 1.5, 16), b=-0.1).eval()


# --- the schedule ---------------------------------------------------------------------------


@pytest.mark.parametrize("bound", ["cohen", "two_sided", "drs"])
@pytest.mark.parametrize("target_margin", [0.0, 1.0, 2.0, 3.0, 3.7])
def test_the_schedule_spends_exactly_alpha_on_looks_that_can_reach_the_target(bound, target_margin):
    alpha, n_max = 0.001, 100_000
    plan = schedule(bound, n_max=n_max, alpha=alpha, target_margin=target_margin, num_classes=10)
    assert plan.sizes[-1] == n_max and plan.sizes[0] >= FIRST_LOOK
    assert list(plan.sizes) == sorted(set(plan.sizes))
    assert math.isclose(sum(plan.alphas), alpha, rel_tol=1e-12)
    spenders = [(n, a) for n, a in zip(plan.sizes[:-1], plan.alphas[:-1], strict=True) if a > 0]
    assert plan.alphas[-1] == (FINAL_SHARE * alpha if spenders else alpha)
    for n, a in spenders:  # every look given α could certify the target with unanimous votes
        assert sequential._reaches(bound, n, a, target_margin, 10)
    if spenders:  # the futility-only looks are the small ones
        first = plan.sizes.index(spenders[0][0])
        assert all(a == 0 for a in plan.alphas[:first]) and all(a > 0 for a in plan.alphas[first:])


def test_a_larger_target_spends_alpha_on_fewer_looks():
    spenders = [sum(a > 0 for a in schedule("cohen", n_max=100_000, alpha=0.001, target_margin=m,
                                            num_classes=2).alphas) for m in (0.5, 2.0, 3.0, 3.6)]
    assert spenders == sorted(spenders, reverse=True) and spenders[0] > spenders[-1]


@pytest.mark.parametrize("sampling, target, expected", [
    ("sequential", 0, 0.0), ("sequential", 0.5, 0.5), ("fixed", None, None), ("adaptive", None, None),
])
def test_check_target_accepts(sampling, target, expected):
    assert check_target(sampling, target) == expected


@pytest.mark.parametrize("sampling, target, message", [
    ("sequential", None, "needs target_radius"), ("fixed", 0.5, "applies to sampling 'sequential' only"),
    ("adaptive", 0.5, "applies to sampling 'sequential' only"), ("sequential", -0.1, "target_radius"),
    ("sequential", math.nan, "target_radius"), ("sequential", math.inf, "target_radius"),
    ("sequential", True, "target_radius"), ("sequential", "0.5", "target_radius"),
])
def test_check_target_refuses(sampling, target, message):
    with pytest.raises(InvalidParameters, match=message):
        check_target(sampling, target)


def test_futility_is_decided_by_what_n_max_could_give():
    plan = schedule("cohen", n_max=100_000, alpha=0.001, target_margin=2.0, num_classes=2)
    # pA ≈ 0.999 after 1,000 votes: Φ⁻¹ ≈ 3 is within reach of 2σ, so keep going
    assert not futile("cohen", 0, [np.array([999, 1])], plan)
    # pA ≈ 0.9 after 10,000 votes: Φ⁻¹(0.9) ≈ 1.28, 2σ is out of reach
    assert futile("cohen", 0, [np.array([9_000, 1_000])], plan)
    assert futile("cohen", 0, [np.array([40, 60])], plan)  # cA is not winning: abstention decided


# --- certificates -------------------------------------------------------------------------


def test_the_certificate_records_the_look_it_comes_from(model):
    x = point_at(model, SHAPE, 2.0 * SIGMA)
    kw = dict(num_classes=2, sigma=SIGMA, n0=100, n=100_000, alpha=0.001, batch_size=4096, seed=3)
    cert = certify(model, x, sampling="sequential", target_radius=1.0 * SIGMA, **kw)
    plan = schedule("cohen", n_max=100_000, alpha=0.001, target_margin=1.0, num_classes=2)
    assert (cert.sampling, cert.n_max, cert.target_radius, cert.tolerance) == ("sequential", 100_000, 0.25, None)
    assert cert.prediction == 1 and 1.0 * SIGMA <= cert.radius <= 2.0 * SIGMA
    assert cert.n in plan.sizes and cert.look_alpha == plan.alphas[plan.sizes.index(cert.n)]
    assert cert.p_a_lower == cohen_bound(cert.n_a, cert.n, cert.look_alpha, cert.noise_tail)  # that look's own bound
    assert cert.samples == 100 + cert.n < 10_000  # pA = Φ(2) needs a few hundred votes for 1σ
    again = certify(model, x, sampling="sequential", target_radius=1.0 * SIGMA, **kw)
    assert again.replace(seconds=0) == cert.replace(seconds=0)
    with pytest.raises(InvalidParameters, match="target_radius"):
        certify(model, x, target_radius=0.1, **kw)
    with pytest.raises(InvalidParameters, match="needs target_radius"):
        certify(model, x, sampling="sequential", **kw)


def test_a_target_out_of_reach_stops_early_without_claiming_it(model):
    x = point_at(model, SHAPE, 1.0 * SIGMA)  # exact radius 1σ; the target is 2σ
    cert = certify(model, x, num_classes=2, sigma=SIGMA, n0=100, n=100_000, alpha=0.001, seed=0,
                   sampling="sequential", target_radius=2.0 * SIGMA, batch_size=4096)
    assert cert.samples < 20_000 and cert.radius < 2.0 * SIGMA


def test_a_target_only_n_max_may_reach_takes_every_look_and_the_last_at_its_share(model):
    """pA = Φ(1), n_max = 20,000: the last look (at α/2) gives about 0.965σ, the one before it
    about 0.94σ; a target between them is reached, if at all, at the last look."""
    x = point_at(model, SHAPE, 1.0 * SIGMA)
    alpha, last = 0.001, 0
    for seed in range(6):
        cert = certify(model, x, num_classes=2, sigma=SIGMA, n0=100, n=20_000, alpha=alpha, seed=seed,
                       sampling="sequential", target_radius=0.955 * SIGMA, batch_size=4096)
        if cert.samples == 20_100:
            last += 1
            assert cert.n == 20_000 and cert.look_alpha == FINAL_SHARE * alpha
            assert cert.p_a_lower == cohen_bound(cert.n_a, 20_000, FINAL_SHARE * alpha, cert.noise_tail)
    assert last >= 3


def test_early_abstention_when_no_class_can_win():
    cert = certify(Thirds(), torch.zeros(SHAPE), num_classes=3, sigma=1.0, n0=200, n=100_000,
                   alpha=0.001, batch_size=20_000, seed=0, sampling="sequential", target_radius=0.0)
    assert cert.abstained and cert.radius == 0.0 and cert.samples < 2_000


def test_drs_records_the_look():
    g = torch.Generator().manual_seed(0)
    left, right = HalfSpace(torch.randn(24, generator=g), 0.05), HalfSpace(torch.randn(24, generator=g), -0.02)
    x = torch.rand((2, 4, 6), generator=g)
    cert = certify_drs(left, right, x, num_classes=2, sigma=0.3, n=20_000, seed=1, sampling="sequential",
                       target_radius=0.0)
    assert cert.sampling == "sequential" and cert.n_max == 20_000 and cert.target_radius == 0.0
    assert cert.samples >= 100 + cert.n and max(cert.n_a_halves) <= cert.n
    if not cert.abstained:
        assert cert.look_alpha is not None and cert.look_alpha < 0.001


# --- the soundness check catches the peeking variant ----------------------------------------


def peeking(model, x, *, n0, n_max, alpha, target, seed):
    """UNSOUND: the same looks, but every look's bound at the full α (optional stopping),
    keeping the best radius."""
    g = make_generator(seed, "cpu")
    counts0 = sample_counts(model, x, SIGMA, n0, num_classes=2, batch_size=n_max, generator=g)
    c_a = int(np.argmax(counts0))
    best, n_a, drawn = None, 0, 0
    for size in schedule("cohen", n_max=n_max, alpha=alpha, target_margin=target / SIGMA, num_classes=2).sizes:
        n_a += int(sample_counts(model, x, SIGMA, size - drawn, num_classes=2, batch_size=n_max, generator=g)[c_a])
        drawn = size
        radius = cohen_radius(SIGMA, cp_lower(n_a, drawn, alpha))
        if radius is not None and (best is None or radius > best):
            best = radius
        if best is not None and best >= target:
            break
    return c_a, best


def sound(model, x, *, n0, n_max, alpha, target, seed):
    cert = certify(model, x, num_classes=2, sigma=SIGMA, n0=n0, n=n_max, alpha=alpha, batch_size=n_max,
                   seed=seed, sampling="sequential", target_radius=target)
    return cert.prediction, None if cert.abstained else cert.radius


def test_the_check_catches_a_bound_recomputed_at_full_alpha_after_peeking(model):
    """A target just above the exact radius: a sound run rarely gets there, so it takes
    every look; the peeking variant's best of seven full-α bounds overshoots far too often."""
    x = point_at(model, SHAPE, 0.5 * SIGMA)
    exact = abs(float(model.signed_distance(x.unsqueeze(0))))
    runs, kw = 400, dict(n0=50, n_max=6400, alpha=0.1, target=1.05 * exact)

    def violations(variant) -> int:
        answers = (variant(model, x, seed=seed, **kw) for seed in range(runs))
        return sum(r is not None and (r > exact or c != 1) for c, r in answers)

    assert_rate_at_most(violations(sound), runs, 0.1, "sequential CERTIFY")
    assert rate_is_too_high(violations(peeking), runs, 0.1)


def test_exact_radius_is_reached_when_the_target_is_below_it(model):
    """Far from the target the answer is decided after few votes, and stays sound: across
    seeds, the radius never exceeds the exact one more often than α allows."""
    x = point_at(model, SHAPE, float(norm.ppf(0.99)) * SIGMA)
    exact = abs(float(model.signed_distance(x.unsqueeze(0))))
    runs, alpha, over, samples = 300, 0.05, 0, []
    for seed in range(runs):
        cert = certify(model, x, num_classes=2, sigma=SIGMA, n0=50, n=51_200, alpha=alpha, batch_size=8192,
                       seed=seed, sampling="sequential", target_radius=0.5 * exact)
        over += cert.prediction is not None and cert.radius > exact
        samples.append(cert.samples)
    assert_rate_at_most(over, runs, alpha, "sequential CERTIFY far from its target")
    assert np.median(samples) < 2_000
