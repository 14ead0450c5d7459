"""σ search: finds a larger certified radius than a too-small σ, and stays in bounds."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import norm

from smoothcert.bounds import InvalidParameters, cohen_bound
from smoothcert.sampling import make_generator
from smoothcert.sigma import SigmaSearch, ddrs_ascent, search_sigma
from smoothcert.smoothing import certify

from .exact import HalfSpace, Slab, point_at

SHAPE = (1, 4, 4)
LOW, HIGH = 0.05, 1.0


@pytest.fixture(scope="module")
def model() -> HalfSpace:
    # A steep softmax, so the soft scores ψ_σ track the hard votes.
    return HalfSpace(torch.linspace(-1.0, 1.5, 16), b=-0.1, scale=50.0).eval()


def search(model, x, method, **request):
    return search_sigma(
        model, x, SigmaSearch(method=method, **request), num_classes=2, sigma_default=0.1,
        sigma_min=LOW, sigma_max=HIGH, n=100_000, alpha=0.001, batch_size=1000,
        generator=make_generator(0, "cpu"),
    )


@pytest.mark.parametrize("method", ["ddrs", "insta"])
def test_search_beats_a_too_small_sigma(model, method):
    """2.0 from the boundary, σ = 0.1 caps the radius near 3.8σ ≈ 0.37 at n = 100k. The
    search must find a σ whose certificate is clearly larger, and never above the exact 2.0."""
    exact = 2.0
    x = point_at(model, SHAPE, exact)
    kw = dict(num_classes=2, n0=100, n=100_000, alpha=0.001, batch_size=25_000, seed=1)
    capped = certify(model, x, sigma=0.1, **kw)
    record = search(model, x, method)
    found = certify(model, x, sigma=record.sigma, **kw)
    # Unanimous votes: the bound less the noise tail the CPU's generator cannot draw.
    assert capped.radius == pytest.approx(0.1 * norm.ppf(cohen_bound(100_000, 100_000, 0.001, capped.noise_tail)),
                                          rel=1e-9)
    assert LOW <= record.sigma <= HIGH
    assert found.radius > 3 * capped.radius
    assert found.radius <= exact
    assert record.method == method and record.samples_used > 0 and record.sigma0 == 0.1


def test_ddrs_clamps_to_sigma_max(model):
    x = point_at(model, SHAPE, 5.0)  # the surrogate keeps rising up to σ ≈ 5/2.05 > 1
    record = search(model, x, "ddrs", steps=200, lr=0.05)
    assert record.sigma == HIGH


def test_ddrs_clamps_to_sigma_min():
    """At the centre of a narrow slab (width 0.05) the surrogate R̃ = σ·Φ⁻¹(2Φ(w/σ) − 1)
    peaks near σ ≈ 0.03 < σ_min, so the ascent from 0.055 (where p1 ≈ 0.64 is clearly the
    top class) drives σ down; it must stop at
    σ_min, never below (the reference code let σ go negative)."""
    slab = Slab(torch.ones(16), width=0.05, scale=2000.0).eval()
    x = torch.zeros(SHAPE)
    seen = []
    sigma = ddrs_ascent(slab, x, 0.055, sigma_min=LOW, sigma_max=HIGH, steps=150, lr=0.01,
                        samples=256, generator=make_generator(0, "cpu"),
                        progress=lambda d, t: seen.append(d))
    assert sigma == LOW
    assert seen[-1] == 150


def test_search_settings_are_recorded(model):
    x = point_at(model, SHAPE, 1.0)
    record = search(model, x, "ddrs", steps=7, lr=0.02, samples=16, init=0.3)
    assert (record.steps, record.lr, record.samples, record.sigma0) == (7, 0.02, 16, 0.3)
    assert record.samples_used == 7 * 16
    insta = search(model, x, "insta", steps=2, samples=50)
    assert insta.starts == (0.1, 0.12, 0.25, 0.5, 1.0)
    assert insta.samples_used % 50 == 0 and insta.samples_used >= 5 * 50


def test_search_draws_its_own_samples(model):
    """The search consumes the generator before certification: a certificate after a search
    uses different noise from one that starts on a fresh generator with the same seed."""
    x = point_at(model, SHAPE, 0.05)
    g = make_generator(3, "cpu")
    search_sigma(model, x, SigmaSearch("ddrs", steps=3, samples=8), num_classes=2,
                 sigma_default=0.25, sigma_min=LOW, sigma_max=HIGH, n=1000, alpha=0.01,
                 batch_size=1000, generator=g)
    after = certify(model, x, num_classes=2, sigma=0.25, n=1000, alpha=0.01, generator=g)
    fresh = certify(model, x, num_classes=2, sigma=0.25, n=1000, alpha=0.01, seed=3)
    assert after.n_a != fresh.n_a


@pytest.mark.parametrize("request_, message", [
    (SigmaSearch(method="grid"), "method"),
    (SigmaSearch(steps=-1), "steps"),
    (SigmaSearch(samples=1), "samples"),
    (SigmaSearch(lr=float("nan")), "lr"),
    (SigmaSearch(init=2.0), "range"),
])
def test_bad_search_requests_are_refused(model, request_, message):
    with pytest.raises(InvalidParameters, match=message):
        search_sigma(model, torch.zeros(SHAPE), request_, num_classes=2, sigma_default=0.1,
                     sigma_min=LOW, sigma_max=HIGH, n=1000, alpha=0.01, batch_size=100,
                     generator=make_generator(0, "cpu"))
