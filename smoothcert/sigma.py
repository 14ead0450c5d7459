"""Per-input σ search: DDRS gradient ascent (§3) and the Insta-RS multi-start search (§4).

Guarantees: the σ found lies in the model's [σ_min, σ_max]; the search draws its own noise
from the run's generator before any certification sample, so the samples that choose σ are
never reused to estimate pA; the settings and the samples spent are returned as a record.
A certificate at a searched σ is sound only through the memory (docs/algorithms.md §3.1).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from smoothcert import bounds
from smoothcert.results import SigmaSearchRecord
from smoothcert.sampling import CancelCheck, Cancelled, sample_counts, soft_scores
from smoothcert.search import METHODS, SigmaSearch

__all__ = ["METHODS", "SigmaSearch", "ddrs_ascent", "insta_search", "search_sigma"]

INSTA_STARTS = (0.12, 0.25, 0.5, 1.0)
# Clamp of the top-two soft scores in the DDRS surrogate (keeps Φ⁻¹ finite).
P_CLAMP = (0.02, 0.98)


def ddrs_ascent(
    classifier: nn.Module,
    x: torch.Tensor,
    sigma0: float,
    *,
    sigma_min: float,
    sigma_max: float,
    steps: int,
    lr: float,
    samples: int,
    generator: torch.Generator,
    cancel: CancelCheck | None = None,
    progress=None,
) -> float:
    """σ ← clamp(σ + lr·∂R̃/∂σ, σ_min, σ_max) for `steps` steps, fresh noise every step, with
    R̃(σ) = σ/2·(Φ⁻¹(p1) − Φ⁻¹(p2)) on the clamped top two of ψ_σ(x). Weights are frozen:
    only σ receives a gradient."""
    sigma = min(max(float(sigma0), sigma_min), sigma_max)
    for step in range(steps):
        if cancel is not None and cancel():
            raise Cancelled()
        noise = torch.randn((samples, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
        s = torch.tensor(sigma, device=x.device, dtype=x.dtype, requires_grad=True)
        with torch.enable_grad():
            top2 = soft_scores(classifier, x, s, noise).topk(2).values.clamp(*P_CLAMP)
            radius = s / 2 * (torch.special.ndtri(top2[0]) - torch.special.ndtri(top2[1]))
            (grad,) = torch.autograd.grad(radius, s)
        sigma = min(max(sigma + lr * float(grad), sigma_min), sigma_max)
        if progress is not None:
            progress(step + 1, steps)
    return sigma


def estimated_radius(count: int, total: int, sigma: float, cap: float) -> float:
    """σ·Φ⁻¹(p̃): the radius a certification could give, from a small hard-vote sample.

    p̃ = (k + ½)/(m + 1) keeps Φ⁻¹ finite; `cap` is the largest pA_low the certification's
    own n and α can reach, so a unanimous pilot sample does not promise more than that.
    """
    p = min((count + 0.5) / (total + 1.0), cap)
    return sigma * float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


def insta_search(
    classifier: nn.Module,
    x: torch.Tensor,
    sigma0: float,
    *,
    num_classes: int,
    sigma_min: float,
    sigma_max: float,
    steps: int,
    samples: int,
    cap: float,
    batch_size: int,
    generator: torch.Generator,
    cancel: CancelCheck | None = None,
) -> tuple[float, tuple[float, ...], int]:
    """Multi-start search (documented reconstruction of Insta-RS; the paper has no code).

    Scores every start in {0.12, 0.25, 0.5, 1.0, σ0} (clamped to [σ_min, σ_max]) by
    `estimated_radius` on `samples` fresh noisy votes, then `steps` bracketing rounds each
    scoring the geometric midpoints between the best σ so far and its evaluated neighbours.
    Returns the best σ, the starts and the number of σ values scored.
    """
    starts = tuple(sorted({min(max(s, sigma_min), sigma_max) for s in (*INSTA_STARTS, sigma0)}))

    def score(sigma: float) -> float:
        counts = sample_counts(
            classifier, x, sigma, samples, num_classes=num_classes,
            batch_size=batch_size, generator=generator, cancel=cancel,
        )
        return estimated_radius(int(counts.max()), samples, sigma, cap)

    scores = {s: score(s) for s in starts}
    for _ in range(steps):
        ordered = sorted(scores)
        best = max(ordered, key=lambda s: (scores[s], -s))
        i = ordered.index(best)
        for neighbour in ordered[max(i - 1, 0):i] + ordered[i + 1:i + 2]:
            mid = math.sqrt(best * neighbour)
            if mid not in scores:
                scores[mid] = score(mid)
    return max(scores, key=lambda s: (scores[s], -s)), starts, len(scores)


def search_sigma(
    classifier: nn.Module,
    x: torch.Tensor,
    request: SigmaSearch,
    *,
    num_classes: int,
    sigma_default: float,
    sigma_min: float,
    sigma_max: float,
    n: int,
    alpha: float,
    batch_size: int,
    generator: torch.Generator,
    progress=None,
    cancel: CancelCheck | None = None,
) -> SigmaSearchRecord:
    """Run the requested search for input `x`; `n` and `alpha` are the certification's own
    (insta uses them to cap its radius estimates)."""
    request = request.resolved()
    sigma0 = sigma_default if request.init is None else request.init
    bounds.check_sigma(sigma0, sigma_min, sigma_max)
    if request.method == "ddrs":
        sigma = ddrs_ascent(
            classifier, x, sigma0, sigma_min=sigma_min, sigma_max=sigma_max,
            steps=request.steps, lr=request.lr, samples=request.samples,
            generator=generator, cancel=cancel,
            progress=None if progress is None else lambda d, t: progress(d * request.samples, t * request.samples),
        )
        starts: tuple[float, ...] = ()
        used = request.steps * request.samples
    else:
        sigma, starts, evaluations = insta_search(
            classifier, x, sigma0, num_classes=num_classes, sigma_min=sigma_min,
            sigma_max=sigma_max, steps=request.steps, samples=request.samples,
            cap=bounds.cp_lower(n, n, alpha), batch_size=batch_size,
            generator=generator, cancel=cancel,
        )
        used = evaluations * request.samples
    return SigmaSearchRecord(
        method=request.method, sigma0=float(sigma0), sigma_min=sigma_min, sigma_max=sigma_max,
        steps=request.steps, lr=request.lr, samples=request.samples, starts=starts,
        samples_used=used, sigma=float(sigma),
    )
