"""Models with exact answers (docs/algorithms.md §8), a binomial check of soundness, and the
power of that check against a variant whose error rate is known."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from scipy.stats import binom, binomtest, norm
from torch import nn

from smoothcert import bounds


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


class Strips(nn.Module):
    """K classes by where the projection t = u·x falls: class c for edges[c−1] ≤ t < edges[c]
    (edges ascending, K − 1 of them). Under N(0, σ²I) noise the projection is N(t, σ²), so
    every class probability is exact: p_c = Φ((e_c − t)/σ) − Φ((e_{c−1} − t)/σ)."""

    def __init__(self, u: torch.Tensor, edges: list[float]):
        super().__init__()
        self.register_buffer("u", (u / u.norm()).flatten().float())
        self.register_buffer("edges", torch.tensor(edges, dtype=torch.float32))
        self.num_classes = len(edges) + 1

    def projection(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.u

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = torch.bucketize(self.projection(x), self.edges, right=True)
        return nn.functional.one_hot(index, self.num_classes).float()

    def probabilities(self, x: torch.Tensor, sigma: float) -> list[float]:
        t = float(x.flatten().double() @ self.u.double())
        cuts = [-math.inf, *map(float, self.edges), math.inf]
        return [float(norm.cdf((hi - t) / sigma) - norm.cdf((lo - t) / sigma))
                for lo, hi in zip(cuts, cuts[1:], strict=False)]

    def point_at(self, shape: tuple[int, ...], projection: float, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(shape, generator=g).flatten()
        return (x + (projection - float(x @ self.u)) * self.u).reshape(shape)


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


@lru_cache(maxsize=256)
def flagged_from(runs: int, rate: float) -> int:
    """The fewest failures in `runs` that `rate_is_too_high` flags at `rate`."""
    k = math.ceil(runs * rate)
    while not rate_is_too_high(k, runs, rate):
        k += 1
    return k


def power(variant_rate: float, runs: int, rate: float) -> float:
    """The probability that the check flags a procedure that fails at `variant_rate`: how
    sure a test is to catch an unsound variant, computed before it runs."""
    return float(binom.sf(flagged_from(runs, rate) - 1, runs, variant_rate))


SQRT2 = math.sqrt(2.0)


def first_k(n: int, accept) -> int:
    """The smallest k in 0..n with accept(k) (n + 1 when none): accept must be monotone in k."""
    lo, hi = -1, n + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if accept(mid) else (mid, hi)
    return hi


def half_failure(n: int, level: float, p: float, tail: float) -> float:
    """P(CP_lower(K, n, level) − tail > p) for K ~ Bin(n, p): a bound at `level` fails (one
    DRS half, one σ selector stage)."""
    k = first_k(n, lambda k: bounds.round_down(bounds.cp_lower(k, n, level) - tail) > p)
    return float(binom.sf(k - 1, n, p))
