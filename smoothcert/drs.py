"""Dual Randomized Smoothing (Xia et al., ICLR 2024), docs/algorithms.md §5.

The image is split by a checkerboard into two disjoint half-images of shape [C, H, W/2];
each has its own base classifier, smoothed with the same σ on its own half. With
probability ≥ 1−α the combined vote argmax_c (p_l(c) + p_r(c)) is cA for every ‖δ‖₂ < R,
R = σ/√2·(Φ⁻¹(pA_l_low) + Φ⁻¹(pA_r_low)), each bound at level α/2.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import torch
from torch import nn

from smoothcert import adaptive, bounds, sequential
from smoothcert.results import Certificate
from smoothcert.sampling import CancelCheck
from smoothcert.smoothing import StageProgress, estimate_votes, issue, noise_terms, seed_source, seeded


def _columns(height: int, width: int, parity: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if width % 2:
        raise ValueError(f"dual smoothing needs an even image width, got {width}")
    rows = torch.arange(height, device=device).unsqueeze(1)
    cols = 2 * torch.arange(width // 2, device=device).unsqueeze(0) + (rows + parity) % 2
    return rows, cols


def split_half(x: torch.Tensor, half: int) -> torch.Tensor:
    """Half `half` (0 = left: pixels with (i+j) even; 1 = right: odd) of `[..., C, H, W]`,
    gathered row by row into `[..., C, H, W/2]`; the same mask for every channel."""
    rows, cols = _columns(x.shape[-2], x.shape[-1], half, x.device)
    return x[..., rows, cols]


# The two half views, as shared objects (a scheduler merges batches with the same views).
HALF_VIEWS = (functools.partial(split_half, half=0), functools.partial(split_half, half=1))


def split_checkerboard(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) halves of `[..., C, H, W]`: a disjoint partition of the pixels."""
    return split_half(x, 0), split_half(x, 1)


def merge_checkerboard(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Inverse of `split_checkerboard`."""
    height, half_width = left.shape[-2], left.shape[-1]
    out = left.new_empty((*left.shape[:-1], 2 * half_width))
    for half, part in ((0, left), (1, right)):
        rows, cols = _columns(height, 2 * half_width, half, left.device)
        out[..., rows, cols] = part
    return out


def certify_drs(
    left: nn.Module,
    right: nn.Module,
    x: torch.Tensor,
    *,
    num_classes: int,
    sigma: float,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    sampling: str = "fixed",
    tolerance: float | None = None,
    target_radius: float | None = None,
    batch_size: int = 1000,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    progress: StageProgress | None = None,
    cancel: CancelCheck | None = None,
    n_floor: int = 0,
) -> Certificate:
    """DRS CERTIFY: cA = argmax(counts0_l + counts0_r) on n0 samples; per-half lower bounds
    at α/2 on n fresh samples; abstain when a + b ≤ 0.

    One noise draw per sample serves both halves: they are disjoint, so each half sees
    independent N(0, σ²) noise, and the union bound needs no independence between them.
    sampling="adaptive" and "sequential" treat n as a maximum, as in `smoothing.certify`.
    Each half's bound loses the noise tail of the coordinates it sees (smoothcert.noise).
    """
    bounds.check_sigma(sigma)
    noise_sigma, tail = noise_terms(x, sigma, views=2)
    bounds.check_certify(n0, n, alpha, batch_size, "drs", tail)
    tolerance = adaptive.check_sampling(sampling, tolerance)
    target_radius = sequential.check_target(sampling, target_radius)
    started = time.perf_counter()
    source = seed_source(seed, generator)
    seed, generator = seeded(seed, generator, x.device)

    def estimate(c_a: int, counts: list[np.ndarray], level: float) -> tuple[float | None, dict]:
        n_a = (int(counts[0][c_a]), int(counts[1][c_a]))
        p_low = bounds.drs_bounds(n_a[0], n_a[1], int(counts[0].sum()), level, tail)
        return bounds.drs_radius(noise_sigma, *p_low), dict(n_a_halves=n_a, p_a_lower_halves=p_low)

    c_a, radius, fields = estimate_votes(
        (left, right), HALF_VIEWS, x, sigma, n0=n0, n=n, alpha=alpha, bound="drs", sampling=sampling,
        tolerance=tolerance, target_radius=target_radius, estimate=estimate, num_classes=num_classes,
        tail=tail, n_floor=n_floor, batch_size=batch_size, generator=generator, progress=progress, cancel=cancel,
    )
    return issue(
        c_a, radius, sigma=float(sigma), bound="drs", n0=n0, alpha=alpha, batch_size=batch_size, seed=seed,
        sampling=sampling, n_max=n, tolerance=tolerance, target_radius=target_radius, noise_sigma=noise_sigma,
        noise_tail=tail, seed_source=source, seconds=time.perf_counter() - started, **fields,
    )
