"""The σ selector's CERTIFY and PREDICT (smoothcert.selector) against models with exact answers.

The selector here is exact: a linear σ estimator over two levels (its smoothed version keeps
the index it picks at x within exactly the distance to its hyperplane) over two linear
experts, built so that the other level's expert predicts another class wherever the
estimator's hyperplane is crossed. The smoothed selector's robust radius at x is then exactly
min(distance to the estimator's plane, distance to the chosen expert's plane): a certificate
that ignores R_σ claims too much, and each stage's bound must hold at α/2. Each check also
runs an unsound variant, whose failure rate is computed exactly, and asserts that it is caught.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import binom, norm

import smoothcert.selector as selector
from smoothcert import bounds
from smoothcert.seeds import derive_seed
from smoothcert.selector import certify_selector, predict_selector
from smoothcert.smoothing import certify

from .exact import HalfSpace, assert_rate_at_most, first_k, half_failure, power, rate_is_too_high

SHAPE = (1, 4, 4)
SIGMAS = (0.5, 0.25)  # the estimator picks index 1 (σ = 0.25) at the test points
SIGMA_E = 0.5
ALPHA = 0.2  # large, so that failures are frequent enough to count in a few hundred runs
MIN_POWER = 0.99
N0, N = 50, 300


def directions(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three orthonormal directions of the 16-pixel input space."""
    q, _ = torch.linalg.qr(torch.randn(16, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return tuple(q[:, i].float() for i in range(3))


def through(direction: torch.Tensor, x: torch.Tensor, signed_distance: float) -> HalfSpace:
    """A half-space classifier whose signed distance at x is `signed_distance`."""
    model = HalfSpace(direction, 0.0).eval()
    model.offset = signed_distance - float(model.signed_distance(x.unsqueeze(0)))
    return model


class Setup:
    """x; the estimator at distance r_e (index 1 on its side); expert 1 (σ = 0.25) at distance
    r_1 (class 1 at x); expert 0 (σ = 0.5) says class 0 everywhere near x. The selector's
    exact radius at x is min(r_e, r_1)."""

    def __init__(self, r_e: float, r_1: float, same_direction: bool = False):
        u, v, w = directions()
        self.x = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1))
        self.estimator = through(u, self.x, r_e)
        self.experts = (through(w, self.x, -50.0), through(u if same_direction else v, self.x, r_1))
        self.r_e, self.r_1 = r_e, r_1
        self.p_e = float(norm.cdf(r_e / SIGMA_E))  # the smoothed estimator's P(index 1) at x
        self.p_1 = float(norm.cdf(r_1 / SIGMAS[1]))  # expert 1's smoothed P(class 1) at x
        self.exact = min(r_e, r_1)

    def run(self, seed: int, alpha: float = ALPHA):
        return certify_selector(self.estimator, self.experts, self.x, sigmas=SIGMAS, sigma_e=SIGMA_E,
                                num_classes=2, n0=N0, n=N, alpha=alpha, batch_size=N, seed=seed)

    def wrong(self, cert) -> bool:
        """The certificate claims more than the truth: another class, or too large a radius."""
        return not cert.abstained and (cert.prediction != 1 or cert.radius > self.exact)

    def bound_failed(self, cert) -> bool:
        """Either stage's lower bound lies above the probability it bounds."""
        est = cert.selector.estimator
        truth = (1 - self.p_e, self.p_e)
        if est.p_a_lower > truth[est.prediction if est.prediction is not None else 1]:
            return True
        return cert.selector.sigma_index == 1 and cert.p_a_lower is not None and cert.p_a_lower > self.p_1


def selection_right(p: float, n0: int = N0) -> float:
    """P(the n0 selection votes name the class of probability p > 1/2; ties go to index 0)."""
    return float(binom.sf(n0 // 2, n0, p))


def certifies(n: int, level: float, p: float, tail: float) -> float:
    """P(CP_lower(K, n, level) − tail > 1/2) for K ~ Bin(n, p): a stage gives a radius."""
    k = first_k(n, lambda k: bounds.round_down(bounds.cp_lower(k, n, level) - tail) > 0.5)
    return float(binom.sf(k - 1, n, p))


# --- each stage at α/2: the check catches a full α on each ---------------------------------------


def test_each_stage_bounds_at_half_alpha_and_the_check_catches_a_full_alpha_per_stage():
    setup = Setup(r_e=0.5, r_1=0.2)
    runs = 1000
    certs = [setup.run(seed) for seed in range(runs)]
    assert all(c.alpha == ALPHA and c.selector.alpha_sigma == c.selector.alpha_class == ALPHA / 2 for c in certs)
    assert_rate_at_most(sum(map(setup.wrong, certs)), runs, ALPHA, "selector certificates")
    assert_rate_at_most(sum(map(setup.bound_failed, certs)), runs, ALPHA, "selector stage bounds")

    # UNSOUND: each stage's bound at the full α. Recomputed from the votes each run drew; the
    # stages' noise is independent, so the variant fails at least at
    # P(selection right)·[f_e + P(stage 1 certifies at α/2 and holds at α)·f_1].
    tail = certs[0].noise_tail
    f_e, f_1 = half_failure(N, ALPHA, setup.p_e, tail), half_failure(N, ALPHA, setup.p_1, tail)
    certified = certifies(N, ALPHA / 2, setup.p_e, tail) - half_failure(N, ALPHA, setup.p_e, tail)
    rate = selection_right(setup.p_e) * (f_e + certified * f_1)
    assert power(rate, runs, ALPHA) > MIN_POWER, rate

    def full_alpha(k: int) -> float:
        return bounds.round_down(bounds.cp_lower(k, N, ALPHA) - tail)

    def full_alpha_fails(c) -> bool:
        est = c.selector.estimator
        truth = 1 - setup.p_e if est.prediction == 0 else setup.p_e  # an abstention's votes are index 1's
        return full_alpha(est.n_a) > truth or (c.selector.sigma_index == 1 and full_alpha(c.n_a) > setup.p_1)

    unsound = sum(map(full_alpha_fails, certs))
    assert rate_is_too_high(unsound, runs, ALPHA), (unsound, runs, rate)

    # Stage by stage: each bound fails at most at α/2, and a stage at the full α is told apart.
    stage_1 = [c.selector.estimator for c in certs]
    assert_rate_at_most(sum(e.p_a_lower > setup.p_e for e in stage_1 if e.prediction != 0), runs, ALPHA / 2,
                        "the estimator's bound")
    assert power(f_e, runs, ALPHA / 2) > MIN_POWER, f_e
    assert rate_is_too_high(sum(full_alpha(e.n_a) > setup.p_e for e in stage_1 if e.prediction != 0), runs, ALPHA / 2)


def test_how_many_runs_tell_a_stage_at_alpha_from_one_at_half_alpha():
    """The exact failure rate of a stage's bound at α and at α/2 (n = 300, this test's p), and
    the fewest runs for which the binomial check flags the α stage with probability 0.99: the
    count the tests above must reach (they use 1,000)."""
    p_e, tail = float(norm.cdf(1.0)), 0.0
    at_alpha, at_half = half_failure(N, ALPHA, p_e, tail), half_failure(N, ALPHA / 2, p_e, tail)
    assert at_half <= ALPHA / 2 < at_alpha <= ALPHA
    needed = next(r for r in range(50, 5001, 50) if power(at_alpha, r, ALPHA / 2) >= MIN_POWER)
    assert needed <= 1000, (needed, at_alpha, at_half)


# --- R_σ caps the radius: the check catches a certificate that ignores it ------------------------


def test_the_radius_never_exceeds_r_sigma_and_the_check_catches_ignoring_it():
    """The estimator's plane is near (r_e = 0.2), the chosen expert's far (r_1 = 0.6): beyond
    r_e the other level's expert answers, with the other class, so the exact radius is r_e
    although the chosen expert alone certifies ≈ 0.5."""
    setup = Setup(r_e=0.2, r_1=0.6)
    runs = 300
    certs = [setup.run(seed) for seed in range(runs)]
    certified = [c for c in certs if not c.abstained]
    assert len(certified) > runs // 2
    assert all(c.radius == min(c.selector.radius_sigma, c.selector.radius_class) for c in certified)
    assert_rate_at_most(sum(map(setup.wrong, certs)), runs, ALPHA, "selector radius ≤ r_e")

    # UNSOUND: the radius R_c alone. It exceeds r_e whenever stage 1 certifies and expert 1's
    # bound gives R_c > r_e, i.e. pA_low > Φ(r_e/σ_1): computed exactly, a lower bound.
    tail = certs[0].noise_tail
    def radius(k: int) -> float:
        return bounds.cohen_radius(SIGMAS[1], bounds.round_down(bounds.cp_lower(k, N, ALPHA / 2) - tail)) or 0.0

    k = first_k(N, lambda k: radius(k) > setup.r_e)
    rate = (selection_right(setup.p_e) * (certifies(N, ALPHA / 2, setup.p_e, tail)
                                           - half_failure(N, ALPHA / 2, setup.p_e, tail))
            * float(binom.sf(k - 1, N, setup.p_1)))
    assert power(rate, runs, ALPHA) > MIN_POWER, rate
    unsound = sum(not c.abstained and c.selector.radius_class > setup.exact for c in certs)
    assert rate_is_too_high(unsound, runs, ALPHA), (unsound, runs, rate)


# --- fresh samples for the classifier stage ------------------------------------------------------


def test_stages_draw_independent_streams_and_the_proof_does_not_need_them(monkeypatch):
    """The classifier stage draws fresh noise from a stream derived from the run's seed. The
    union bound does not lean on that independence (docs/algorithms.md §9: a stage-1 bound
    that holds pins the chosen level to the true one, so a failure is a stage-1 failure or a
    failure of that one level's bound, each at α/2 whatever their dependence): the variant that
    feeds both stages the very same noise, on an estimator and expert that share their
    direction (the most correlated votes), stays within α."""
    setup = Setup(r_e=0.5, r_1=0.2, same_direction=True)
    cert = setup.run(7)
    assert cert.seed == 7 and cert.selector.estimator.seed == derive_seed(7, 0)
    assert cert.selector.classifier_seed == derive_seed(7, 1) != cert.selector.estimator.seed
    runs = 1000

    def same_noise(seed, generator):
        return seed, [dict(seed=seed, generator=None)] * 2

    monkeypatch.setattr(selector, "_streams", same_noise)
    certs = [setup.run(seed) for seed in range(runs)]
    assert all(c.selector.classifier_seed == c.selector.estimator.seed == c.seed for c in certs)
    assert_rate_at_most(sum(map(setup.bound_failed, certs)), runs, ALPHA, "shared-noise selector")
    assert_rate_at_most(sum(map(setup.wrong, certs)), runs, ALPHA, "shared-noise selector")


# --- records, abstentions, PREDICT ---------------------------------------------------------------


def test_a_certificate_records_both_stages_and_replays_from_its_seed():
    setup = Setup(r_e=0.5, r_1=0.2)
    cert = setup.run(3)
    rec = cert.selector
    assert (cert.prediction, rec.sigma_index, cert.sigma, rec.sigmas, rec.sigma_e) == (1, 1, 0.25, SIGMAS, SIGMA_E)
    assert cert.radius == min(rec.radius_sigma, rec.radius_class) > 0
    assert rec.estimator.sigma == SIGMA_E and rec.estimator.alpha == ALPHA / 2
    assert cert.samples == rec.estimator.samples + N0 + N == 2 * (N0 + N)
    # each stage is exactly smoothing.certify at α/2 with its derived seed
    alone = certify(setup.experts[1], setup.x, num_classes=2, sigma=0.25, n0=N0, n=N, alpha=ALPHA / 2,
                    batch_size=N, seed=rec.classifier_seed)
    assert (alone.n_a, alone.p_a_lower, alone.radius) == (cert.n_a, cert.p_a_lower, rec.radius_class)
    again = setup.run(3)
    assert again.replace(seconds=0, selector=None) == cert.replace(seconds=0, selector=None)
    assert again.selector.estimator.replace(seconds=0) == rec.estimator.replace(seconds=0)
    assert cert.to_dict()["selector"]["estimator"]["sigma"] == SIGMA_E  # plain data all through


def test_either_stage_abstaining_is_an_abstention():
    """On a plane (p = 1/2) a stage gives a radius with probability below α/2 = 0.0005."""
    on_the_plane = Setup(r_e=0.0, r_1=0.6)  # the estimator cannot tell the levels apart
    cert = on_the_plane.run(0, alpha=0.001)
    assert cert.abstained and cert.radius == 0 and cert.selector.sigma_index is None
    assert cert.sigma == SIGMA_E and cert.selector.radius_class is None and cert.alpha == 0.001
    undecided = Setup(r_e=0.6, r_1=0.0)  # the chosen expert cannot tell the classes apart
    cert = undecided.run(0, alpha=0.001)
    assert cert.abstained and cert.radius == 0 and cert.selector.sigma_index == 1
    assert cert.selector.radius_sigma > 0 and cert.selector.radius_class is None and cert.sigma == 0.25


def test_predict_chooses_the_level_then_the_class():
    setup = Setup(r_e=0.5, r_1=0.2)
    pred = predict_selector(setup.estimator, setup.experts, setup.x, sigmas=SIGMAS, sigma_e=SIGMA_E,
                            num_classes=2, n=2000, alpha=0.01, batch_size=500, seed=1)
    assert (pred.prediction, pred.sigma, pred.alpha, pred.selector.sigma_index) == (1, 0.25, 0.01, 1)
    assert pred.selector.estimator.alpha == 0.005 and pred.selector.estimator.prediction == 1
    assert pred.samples == 4000 and pred.selector.radius_sigma is None
    blind = Setup(r_e=0.0, r_1=0.2)
    pred = predict_selector(blind.estimator, blind.experts, blind.x, sigmas=SIGMAS, sigma_e=SIGMA_E,
                            num_classes=2, n=2000, alpha=0.01, batch_size=500, seed=1)
    assert pred.abstained and pred.selector.sigma_index is None and pred.sigma == SIGMA_E


@pytest.mark.parametrize(("sigmas", "sigma_e", "experts", "message"), [
    ((0.25,), 0.5, 1, "at least two"),
    ((0.25, 0.25), 0.5, 1, "distinct"),
    ((0.25, 0.5), 0.0, 1, "sigma"),
    ((0.25, 0.5), 0.5, 3, "one per noise level"),
    ((0.25, math.nan), 0.5, 1, "sigma"),
])
def test_bad_selectors_are_refused(sigmas, sigma_e, experts, message):
    setup = Setup(r_e=0.5, r_1=0.2)
    with pytest.raises(bounds.InvalidParameters, match=message):
        certify_selector(setup.estimator, setup.experts[:1] * experts, setup.x, sigmas=sigmas, sigma_e=sigma_e,
                         num_classes=2, n0=N0, n=N, alpha=ALPHA, batch_size=N, seed=0)


@pytest.mark.parametrize(("sampling", "extra"), [("adaptive", {"tolerance": 0.1}),
                                                  ("sequential", {"target_radius": 0.1})])
def test_adaptive_and_sequential_sampling_run_in_both_stages(sampling, extra):
    setup = Setup(r_e=0.5, r_1=0.2)
    certs = [certify_selector(setup.estimator, setup.experts, setup.x, sigmas=SIGMAS, sigma_e=SIGMA_E,
                              num_classes=2, n0=N0, n=20_000, alpha=0.01, batch_size=5000, seed=seed,
                              sampling=sampling, **extra) for seed in range(20)]
    for cert in certs:
        est = cert.selector.estimator
        assert cert.sampling == est.sampling == sampling and est.alpha == 0.005
        assert cert.n <= 20_000 and est.n <= 20_000 and cert.samples < 2 * (N0 + 20_000)
        assert not setup.wrong(cert)  # exact answers: never more than min(r_e, r_1) = 0.2
    assert sum(not c.abstained for c in certs) >= 15


@pytest.fixture(scope="module")
def exact_bundle(tmp_path_factory):
    """The exact selector of these tests as a bundle (torch.export form)."""
    from smoothcert.bundle import load_bundle, save_bundle

    setup = Setup(r_e=0.5, r_1=0.2)
    folder = tmp_path_factory.mktemp("exact-selector")
    spec = {"name": "exact", "kind": "selector", "input_shape": list(SHAPE), "num_classes": 2,
            "selector": {"sigmas": list(SIGMAS), "sigma_e": SIGMA_E, "experts": "per_sigma"}}
    save_bundle(folder, spec, (setup.estimator, *setup.experts))
    return setup, load_bundle(folder)


@pytest.mark.parametrize("mode", ["fp32", "fp32+channels_last", "bf16", "fp32+fuse", "bf16+fuse+channels_last"])
def test_every_cpu_numeric_mode_runs_both_stages_and_stays_sound(exact_bundle, mode):
    from smoothcert.certifier import Certifier

    setup, bundle = exact_bundle
    certifier = Certifier(bundle, device="cpu", numeric_mode=mode)
    runs = 200
    certs = [certifier.certify(setup.x, n0=N0, n=N, alpha=ALPHA, batch_size=N, seed=seed) for seed in range(runs)]
    assert all(c.numeric_mode == mode and c.selector is not None for c in certs)
    assert sum(not c.abstained for c in certs) > runs // 2
    assert_rate_at_most(sum(map(setup.wrong, certs)), runs, ALPHA, f"selector in {mode}")


def test_the_two_sided_bound_runs_in_both_stages_and_stays_sound():
    setup = Setup(r_e=0.5, r_1=0.2)
    runs = 300
    certs = [certify_selector(setup.estimator, setup.experts, setup.x, sigmas=SIGMAS, sigma_e=SIGMA_E,
                              num_classes=2, n0=N0, n=N, alpha=ALPHA, batch_size=N, seed=seed, bound="two_sided")
             for seed in range(runs)]
    assert all(c.bound == c.selector.estimator.bound == "two_sided" for c in certs)
    assert all(c.p_b_upper is not None for c in certs if not c.abstained)
    assert sum(not c.abstained for c in certs) > runs // 2
    assert_rate_at_most(sum(map(setup.wrong, certs)), runs, ALPHA, "two-sided selector certificates")
