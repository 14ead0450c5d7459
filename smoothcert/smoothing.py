"""CERTIFY and PREDICT for Gaussian smoothing (Cohen, Rosenfeld, Kolter 2019).

`certify` returns, with probability ≥ 1−α over its sampling, a class cA and radius R such
that the smoothed classifier g(x+δ) = cA for all ‖δ‖₂ < R, or an abstention. `predict`
returns a class other than g(x) with probability at most α. Abstention is a value
(`prediction is None`), never an exception. See docs/algorithms.md §1 (cohen) and §2 (two_sided).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from smoothcert import adaptive, bounds, noise, sequential
from smoothcert.results import Certificate, Prediction
from smoothcert.sampling import (
    CancelCheck,
    fresh_seed,
    identity,
    make_generator,
    sample_counts,
    sample_counts_multi,
)

# progress(stage, samples_done, samples_total); stages: sigma_search, selection, estimation.
StageProgress = Callable[[str, int, int], None]


def stage(progress: StageProgress | None, name: str, offset: int = 0, total: int | None = None):
    """Adapt a StageProgress to the sampler's (done, total) callback."""
    if progress is None:
        return None
    return lambda done, num: progress(name, offset + done, total if total is not None else num)


def seeded(seed: int | None, generator: torch.Generator | None, device) -> tuple[int | None, torch.Generator]:
    """The (seed, generator) pair a run uses: the caller's generator, or one from `seed`."""
    if generator is not None:
        return seed, generator
    seed = fresh_seed() if seed is None else int(seed)
    return seed, make_generator(seed, device)


def seed_source(seed: int | None, generator: torch.Generator | None) -> str:
    """Who chose the noise: "caller" (a seed or generator was given) or "drawn" (here)."""
    return "caller" if seed is not None or generator is not None else "drawn"


def noise_terms(x: torch.Tensor, sigma: float, views: int = 1) -> tuple[float, float]:
    """(σ the noise has, its tail mass per view) for noise drawn like `x` (smoothcert.noise):
    what every bound and radius of a certificate on `x` must use."""
    return (noise.sigma_used(sigma, x.dtype),
            noise.tail_mass(x.device.type, x.dtype, x.numel() // views, x.numel()))


def select(networks, views, x, sigma, n0, *, progress: StageProgress | None = None,
           **sample) -> tuple[int, list[np.ndarray]]:
    """The selection sample: cA = argmax of n0 votes summed over the networks, and the counts."""
    counts0 = sample_counts_multi(networks, views, x, sigma, n0, progress=stage(progress, "selection"), **sample)
    return int(np.argmax(sum(counts0))), counts0


# The bound of a certificate on estimation counts at a level: (radius or None, its fields).
Estimate = Callable[[int, list[np.ndarray], float], tuple[float | None, dict]]


def estimate_votes(
    networks: Sequence[nn.Module],
    views: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    x: torch.Tensor,
    sigma: float,
    *,
    n0: int,
    n: int,
    alpha: float,
    bound: str,
    sampling: str,
    tolerance: float | None,
    target_radius: float | None,
    estimate: Estimate,
    num_classes: int,
    tail: float = 0.0,
    n_floor: int = 0,
    **sample,
) -> tuple[int, float | None, dict]:
    """Selection and estimation under any sampling rule: (cA, radius or None, the
    certificate's sampling fields: the bound's own fields, n, samples, look_alpha).

    fixed and adaptive: one estimation of n (adaptive: chosen from the selection sample) at α.
    sequential: the looks of smoothcert.sequential, each bound at its own level; the
    largest radius of any look, with that look's n and level. `tail` is the noise tail the
    bounds take off (planning uses it too); `n_floor` is the smallest estimation size adaptive
    and sequential sampling may stop at (a memory's minimum n for commits)."""
    progress = sample.pop("progress", None)
    c_a, counts0 = select(networks, views, x, sigma, n0, progress=progress, num_classes=num_classes, **sample)
    if sampling == "sequential":
        plan = sequential.schedule(bound, n_max=n, alpha=alpha, target_margin=target_radius / sigma,
                                   num_classes=num_classes, tail=tail, first_look=n_floor)
        radius, fields, drawn = look_by_look(networks, views, x, sigma, c_a, plan, target_radius, bound=bound,
                                             estimate=estimate, num_classes=num_classes, progress=progress,
                                             **sample)
        return c_a, radius, dict(fields, samples=n0 + drawn)
    if sampling == "adaptive":  # n from the selection counts alone, before any estimation vote
        n = adaptive.plan(bound, c_a, counts0, n_max=n, alpha=alpha, tolerance=tolerance, tail=tail,
                          n_floor=n_floor).n
    # Fresh votes, never the selection's.
    counts = sample_counts_multi(networks, views, x, sigma, n, num_classes=num_classes,
                                 progress=stage(progress, "estimation"), **sample)
    radius, fields = estimate(c_a, counts, alpha)
    return c_a, radius, dict(fields, n=n, samples=n0 + n)


def look_by_look(networks, views, x, sigma, c_a: int, plan: sequential.Schedule, target_radius: float, *, bound: str,
                 estimate: Estimate, num_classes: int, progress: StageProgress | None,
                 **sample) -> tuple[float | None, dict, int]:
    """Sequential estimation for cA (smoothcert.sequential): fresh votes up to each look of
    `plan`, its bound at its own level, until the target is reached or futile. Returns the
    largest radius of any look (None: none certified) with that look's fields, n and
    look_alpha, and the estimation votes drawn in all."""
    n_max = plan.sizes[-1]
    counts = [np.zeros(num_classes, dtype=np.int64) for _ in networks]
    best: tuple[float | None, dict] | None = None
    drawn = 0
    for size, level in zip(plan.sizes, plan.alphas, strict=True):
        more = sample_counts_multi(networks, views, x, sigma, size - drawn, num_classes=num_classes,
                                   progress=stage(progress, "estimation", drawn, n_max), **sample)
        counts = [c + m for c, m in zip(counts, more, strict=True)]
        drawn = size
        if level > 0:
            radius, fields = estimate(c_a, counts, level)
            look = (radius, dict(fields, n=size, look_alpha=level))
            if best is None or best[0] is None or (radius is not None and radius > best[0]):
                best = look
            if radius is not None and radius >= target_radius:
                break
        if size < n_max and sequential.futile(bound, c_a, counts, plan):
            break
    if best is None:  # stopped before any look that could certify: an early abstention
        _, fields = estimate(c_a, counts, plan.alphas[-1])
        best = (None, dict(fields, n=drawn, look_alpha=plan.alphas[-1]))
    return *best, drawn


def issue(c_a: int, radius: float | None, **fields) -> Certificate:
    """The certificate for cA at `radius`, or an abstention (prediction None, radius 0) when
    the bound gave no radius."""
    return Certificate(prediction=None if radius is None else c_a,
                       radius=0.0 if radius is None else radius, **fields)


def certify(
    classifier: nn.Module,
    x: torch.Tensor,
    *,
    num_classes: int,
    sigma: float,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    bound: str = "cohen",
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
    """CERTIFY: select cA on n0 samples, bound its probability on n fresh samples.

    bound="cohen": R = σ·Φ⁻¹(pA_low), pA_low at level α. bound="two_sided":
    R = σ/2·(Φ⁻¹(pA_low) − Φ⁻¹(pB_up)), α split between the two (see bounds.two_sided_bound).
    sampling="adaptive": n is a maximum; the estimation size is chosen from the selection
    sample alone (smoothcert.adaptive, `tolerance` in units of σ) and recorded as the
    certificate's n, the maximum as n_max. The bounds are the same at the same α.
    sampling="sequential": n is a maximum; votes are drawn in looks until the radius reaches
    `target_radius` or cannot (smoothcert.sequential); each look's bound at its own share
    of α, recorded as look_alpha.
    Every bound is about exact Gaussian noise: the noise tail the generator cannot draw is
    taken off (`noise_tail`), and the radius uses the σ the noise had (`noise_sigma`).
    `n_floor`: no adaptive or sequential estimation smaller than this (a memory's minimum).
    `x` has the model's input shape and lives on the model's device.
    """
    if bound not in ("cohen", "two_sided"):
        raise bounds.InvalidParameters(f"certify takes bound cohen or two_sided, got {bound!r}")
    bounds.check_sigma(sigma)
    noise_sigma, tail = noise_terms(x, sigma)
    bounds.check_certify(n0, n, alpha, batch_size, bound, tail)
    tolerance = adaptive.check_sampling(sampling, tolerance)
    target_radius = sequential.check_target(sampling, target_radius)
    started = time.perf_counter()
    source = seed_source(seed, generator)
    seed, generator = seeded(seed, generator, x.device)

    def estimate(c_a: int, counts: list[np.ndarray], level: float) -> tuple[float | None, dict]:
        (votes,) = counts
        n_a = int(votes[c_a])
        if bound == "cohen":
            p_a_lower = bounds.cohen_bound(n_a, int(votes.sum()), level, tail)
            return bounds.cohen_radius(noise_sigma, p_a_lower), dict(n_a=n_a, p_a_lower=p_a_lower)
        p_a_lower, p_b_upper, c_b = bounds.two_sided_bound(votes.tolist(), c_a, level, tail)
        return (bounds.two_sided_radius(noise_sigma, p_a_lower, p_b_upper),
                dict(n_a=n_a, p_a_lower=p_a_lower, p_b_upper=p_b_upper, runner_up=c_b))

    c_a, radius, fields = estimate_votes(
        [classifier], [identity], x, sigma, n0=n0, n=n, alpha=alpha, bound=bound, sampling=sampling,
        tolerance=tolerance, target_radius=target_radius, estimate=estimate, num_classes=num_classes,
        tail=tail, n_floor=n_floor, batch_size=batch_size, generator=generator, progress=progress, cancel=cancel,
    )
    return issue(
        c_a, radius, sigma=float(sigma), bound=bound, n0=n0, alpha=alpha, batch_size=batch_size, seed=seed,
        sampling=sampling, n_max=n, tolerance=tolerance, target_radius=target_radius, noise_sigma=noise_sigma,
        noise_tail=tail, seed_source=source, seconds=time.perf_counter() - started, **fields,
    )


def predict(
    classifier: nn.Module,
    x: torch.Tensor,
    *,
    num_classes: int,
    sigma: float,
    n: int = 10_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    progress: StageProgress | None = None,
    cancel: CancelCheck | None = None,
) -> Prediction:
    """PREDICT: the top class of n noisy votes, or abstain when the two-sided binomial test
    of the top two counts gives p-value > α."""
    bounds.check_predict(n, alpha, batch_size)
    bounds.check_sigma(sigma)
    started = time.perf_counter()
    source = seed_source(seed, generator)
    seed, generator = seeded(seed, generator, x.device)
    counts = sample_counts(
        classifier, x, sigma, n, num_classes=num_classes, batch_size=batch_size,
        generator=generator, progress=stage(progress, "estimation"), cancel=cancel,
    )
    top2 = np.argsort(-counts, kind="stable")[:2]
    n1, n2 = int(counts[top2[0]]), int(counts[top2[1]]) if len(top2) > 1 else 0
    p_value = bounds.predict_pvalue(n1, n2)
    return Prediction(
        prediction=None if p_value > alpha else int(top2[0]),
        sigma=float(sigma), n=n, alpha=alpha, batch_size=batch_size, seed=seed,
        n1=n1, n2=n2, p_value=p_value, seed_source=source, samples=n, seconds=time.perf_counter() - started,
    )
