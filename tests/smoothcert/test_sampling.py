"""The Monte Carlo sampler: noise law, seeding, batching, progress and cancellation."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import binomtest, norm
from torch import nn

from smoothcert.sampling import Cancelled, derive_seed, effective_batch, make_generator, sample_counts


class Threshold(nn.Module):
    """Class 1 iff pixel `index` exceeds `t`: under N(0, σ²) noise P = Φ((x_i − t)/σ)."""

    def __init__(self, index: int, t: float):
        super().__init__()
        self.index, self.t, self.calls = index, t, 0

    def forward(self, x):
        self.calls += 1
        return torch.stack([torch.zeros(len(x)), (x.flatten(1)[:, self.index] > self.t).float()], 1)


def counts(model, x, sigma, num, batch, seed, **kw):
    return sample_counts(model, x, sigma, num, num_classes=2, batch_size=batch,
                         generator=make_generator(seed, "cpu"), **kw)


@pytest.mark.parametrize("index, t, sigma", [(0, 0.5, 0.25), (7, 0.9, 0.5), (15, 0.2, 0.12)])
def test_noise_is_gaussian_with_sigma_in_pixel_space(index, t, sigma):
    x = torch.linspace(0, 1, 16).reshape(1, 4, 4)
    c = counts(Threshold(index, t), x, sigma, 40_000, 4096, seed=index)
    expected = norm.cdf((float(x.flatten()[index]) - t) / sigma)
    assert c.sum() == 40_000
    assert binomtest(int(c[1]), 40_000, expected).pvalue > 1e-4


def test_same_seed_same_counts_whatever_the_batch_splits():
    x = torch.full((1, 4, 4), 0.5)
    model = Threshold(3, 0.55)
    a = counts(model, x, 0.3, 5000, 1000, seed=9)
    b = counts(model, x, 0.3, 5000, 1000, seed=9)
    c = counts(model, x, 0.3, 5000, 1000, seed=10)
    assert (a == b).all() and not (a == c).all()


def test_progress_between_batches_and_remainder_batch():
    model, seen = Threshold(0, 0.5), []
    c = counts(model, torch.zeros(1, 2, 2), 0.1, 2500, 1000, seed=0, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1000, 2500), (2000, 2500), (2500, 2500)] and model.calls == 3 and c.sum() == 2500


def test_cancel_is_checked_between_batches():
    model, checks = Threshold(0, 0.5), []

    def cancel():
        checks.append(1)
        return len(checks) > 2

    with pytest.raises(Cancelled):
        counts(model, torch.zeros(1, 2, 2), 0.1, 10_000, 1000, seed=0, cancel=cancel)
    assert model.calls == 2  # stopped within one batch of the request


def test_huge_batches_are_capped_by_memory():
    assert effective_batch(100_000, 3 * 224 * 224) < 100_000
    assert effective_batch(1000, 64) == 1000


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(7, 0) == derive_seed(7, 0)
    assert len({derive_seed(7, i) for i in range(100)}) == 100
    assert 0 <= derive_seed(7, 1) < 2**63


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_counts_are_reproducible():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).cuda().eval()
    x = torch.rand(1, 4, 4, device="cuda")
    run = lambda: sample_counts(model, x, 0.5, 20_000, num_classes=3, batch_size=3000,  # noqa: E731
                                generator=make_generator(5, "cuda"))
    a, b = run(), run()
    assert (a == b).all() and a.sum() == 20_000
