"""Models with exact answers (ALGORITHMS.md §8) and a binomial check of soundness."""

from __future__ import annotations

import math

import torch
from scipy.stats import binomtest
from torch import nn


class HalfSpace(nn.Module):
    """Binary linear classifier f(x) = [w·x + b > 0], as logits (−s·z/2, s·z/2) with z the
    signed distance (w·x + b)/‖w‖. Smoothing changes nothing: pA = Φ(|z|/σ), and the exact
    robust radius of the smoothed classifier is |z|. `scale` only sharpens the softmax."""

    def __init__(self, w: torch.Tensor, b: float, scale: float = 1.0):
        super().__init__()
        self.register_buffer("u", (w / w.norm()).flatten().float())
        self.offset = float(b / w.norm())
        self.scale = scale

    def signed_distance(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).double() @ self.u.double() + self.offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1) @ self.u + self.offset
        return torch.stack([-z, z], dim=1) * (self.scale / 2)


class Slab(nn.Module):
    """Class 1 inside |u·x| < width, class 0 outside: more noise lowers p1 at the centre."""

    def __init__(self, u: torch.Tensor, width: float, scale: float = 50.0):
        super().__init__()
        self.register_buffer("u", (u / u.norm()).flatten().float())
        self.width, self.scale = width, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inside = self.width - (x.flatten(1) @ self.u).abs()
        return torch.stack([-inside, inside], dim=1) * (self.scale / 2)


def point_at(model: HalfSpace, shape: tuple[int, ...], signed_distance: float, seed: int = 0) -> torch.Tensor:
    """A point in [0,1]-ish space whose signed distance to the model's hyperplane is given."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    z = float(model.signed_distance(x.unsqueeze(0)))
    return (x.flatten() + (signed_distance - z) * model.u).reshape(shape)


def assert_rate_at_most(failures: int, runs: int, rate: float, what: str) -> None:
    """Fail when `failures` in `runs` is significantly above `rate` (binomial test, 1e-3).

    A sound procedure fails this check with probability below 0.001.
    """
    p = binomtest(failures, runs, rate, alternative="greater").pvalue
    assert p > 1e-3, f"{what}: {failures}/{runs} exceeds rate {rate} (binomial p={p:.2e})"


def rate_is_too_high(failures: int, runs: int, rate: float) -> bool:
    return binomtest(failures, runs, rate, alternative="greater").pvalue <= 1e-3


SQRT2 = math.sqrt(2.0)
