"""What the noise really is (smoothcert.noise, docs/guarantees.md §4): the σ it had, the tail
its generator cannot draw, and that every certificate's bounds and radius use both."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from smoothcert import bounds, noise
from smoothcert.drs import certify_drs
from smoothcert.smoothing import certify

from .exact import HalfSpace, point_at

SHAPE = (1, 4, 4)


def test_the_sigma_a_radius_uses_is_never_above_the_noise_it_had():
    for sigma in (0.1, 0.12, 0.25, 0.3, 0.5, 0.7, 1.0, 1 / 3):
        as_float32 = float(np.float32(sigma))
        assert noise.sigma_used(sigma) == min(sigma, as_float32)
        assert noise.sigma_used(sigma, torch.float64) == sigma
    assert noise.sigma_used(0.7) < 0.7  # float32 rounds 0.7 down: the noise was narrower


def test_tail_mass_by_device_and_dtype():
    assert noise.tail_mass("cpu", torch.float32, 3 * 32 * 32) == pytest.approx((1536 + 24) * 2.0 ** -24)
    assert noise.tail_mass("cpu", "float32", 64) == (32 + 24) * 2.0 ** -24
    assert noise.tail_mass("cpu", "float32", 2, 64) == 2 * 2.0 ** -24  # a view never counts more pairs than values
    assert noise.tail_mass("cpu", "float64", 100) == 100 * 2.0 ** -53
    assert noise.tail_mass("cuda", "float32", 100) == 100 * 2.0 ** -32
    assert noise.cap("cpu", "float32") == pytest.approx(math.sqrt(48 * math.log(2)))
    for device, dtype in (("mps", "float32"), ("cpu", "float16"), ("cuda", "bfloat16")):
        with pytest.raises(bounds.InvalidParameters, match="no known noise generator"):
            noise.tail_mass(device, dtype, 10)


def test_cpu_float32_gaussians_never_pass_the_cap_of_their_pair():
    """The layout the CPU tail bound rests on: values j and j + 8 of each block of 16 come
    from one Box–Muller pair whose radius √(−2 ln u) is capped by the 24-bit grid of u
    (2^23 pairs: the smallest u drawn is near the grid's smallest cell)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1 << 24, generator=g).double().reshape(-1, 16)
    pairs = torch.sqrt(z[:, :8] ** 2 + z[:, 8:] ** 2)
    assert float(pairs.max()) <= noise.cap("cpu", "float32") * (1 + 1e-6)
    # -2 ln u of a pair is its squared radius: the smallest u the grid allows is 2^-24.
    assert float(torch.exp(-pairs.max() ** 2 / 2)) >= 2.0 ** -24 * (1 - 1e-4)


@pytest.fixture(scope="module")
def model() -> HalfSpace:
    return HalfSpace(torch.linspace(-1.0, 1.5, 16), b=-0.1).eval()


def test_a_certificate_takes_the_tail_off_its_bound_and_uses_the_sigma_the_noise_had(model):
    x = point_at(model, SHAPE, 1.5)
    cert = certify(model, x, num_classes=2, sigma=0.7, n0=50, n=2000, alpha=0.001, batch_size=2000, seed=1)
    tail = noise.tail_mass("cpu", torch.float32, 16)
    assert cert.noise_tail == tail and cert.noise_sigma == noise.sigma_used(0.7) < 0.7
    assert cert.p_a_lower == bounds.cohen_bound(cert.n_a, 2000, 0.001, tail) < bounds.cp_lower(cert.n_a, 2000, 0.001)
    assert cert.radius == bounds.cohen_radius(cert.noise_sigma, cert.p_a_lower)
    assert cert.radius < 0.7 * float(norm.ppf(cert.p_a_lower))  # what σ itself would have claimed


def test_each_drs_half_loses_the_tail_of_what_it_sees():
    g = torch.Generator().manual_seed(0)
    left, right = HalfSpace(torch.randn(8, generator=g), 0.05).eval(), HalfSpace(torch.randn(8, generator=g), 0.0)
    x = torch.rand((1, 4, 4), generator=g)
    cert = certify_drs(left, right, x, num_classes=2, sigma=0.25, n0=50, n=1000, alpha=0.01, batch_size=1000, seed=0)
    tail = noise.tail_mass("cpu", torch.float32, 8, 16)
    assert cert.noise_tail == tail
    assert cert.p_a_lower_halves == bounds.drs_bounds(*cert.n_a_halves, 1000, 0.01, tail)
