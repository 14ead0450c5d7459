"""The σ selector: a per-input noise level with no memory (Sun, Mao and Vechev, "Dual
Randomized Smoothing: Beyond Global Noise Variance", ICLR 2026), docs/algorithms.md §9.

Not Xia et al.'s dual smoothing of two half-images (`smoothcert.drs`): here a **σ estimator**
g_e, a classifier over the noise levels Σ = (σ_0, …, σ_{m−1}), smoothed at its own fixed σ_e,
chooses the level, and the classifier smoothed at that level chooses the class. The smoothed
selector is the function

    h(x) = G_{i(x)}(x),   i(x) = argmax_j P(g_e(x + σ_e·ε) = j),
    G_i(x) = argmax_c P(f_i(x + σ_i·ε) = c),

fixed once the networks are: it never depends on what was certified before, so its answers
need no memory and do not depend on arrival order.

`certify_selector`: CERTIFY the smoothed estimator at α_σ = α/2 (its own selection and
estimation samples) → index i and radius R_σ within which i(·) is constant; CERTIFY f_i at
σ_i at α_c = α/2 on fresh, independent samples → class c and R_c. With probability ≥ 1 − α
(union bound: the second stage's bound holds at α/2 given any i, the first's at α/2) both
hold, and then h(x') = G_i(x') = c for every ‖x' − x‖ < min(R_σ, R_c). Either stage's
abstention is the answer's abstention.

`predict_selector`: PREDICT the estimator at α/2, then f_i at σ_i at α/2; the answer is a
class other than h(x) with probability at most α.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from smoothcert import bounds
from smoothcert.results import Certificate, Prediction, SelectorRecord
from smoothcert.sampling import CancelCheck, fresh_seed
from smoothcert.seeds import derive_seed
from smoothcert.smoothing import StageProgress, certify, predict, seed_source

ESTIMATOR_STAGE = "sigma_search"  # the estimator's sampling shows as choosing σ


def check_selector(sigmas: Sequence[float], sigma_e: float, experts: Sequence[nn.Module]) -> tuple[float, ...]:
    """Σ as a tuple, after checking it and σ_e; one expert for all of Σ or one per level."""
    sigmas = tuple(float(s) for s in sigmas)
    if len(sigmas) < 2:
        raise bounds.InvalidParameters(f"a σ selector needs at least two noise levels, got {list(sigmas)}")
    for s in (*sigmas, sigma_e):
        bounds.check_sigma(s)
    if len(set(sigmas)) != len(sigmas):
        raise bounds.InvalidParameters(f"the noise levels must be distinct, got {list(sigmas)}")
    if len(experts) not in (1, len(sigmas)):
        raise bounds.InvalidParameters(f"a σ selector takes one classifier or one per noise level "
                                       f"({len(sigmas)}), got {len(experts)}")
    return sigmas


def _streams(seed: int | None, generator: torch.Generator | None) -> tuple[int | None, list[dict]]:
    """(the run's seed, the two stages' noise sources): independent streams derived from one
    seed, or the caller's generator drawn from stage after stage (fresh draws either way)."""
    if generator is not None:
        return seed, [dict(seed=seed, generator=generator), dict(seed=seed, generator=generator)]
    seed = fresh_seed() if seed is None else int(seed)
    return seed, [dict(seed=derive_seed(seed, stage), generator=None) for stage in (0, 1)]


def _progress(progress: StageProgress | None, estimator: bool) -> StageProgress | None:
    if progress is None or not estimator:
        return progress
    return lambda _stage, done, total: progress(ESTIMATOR_STAGE, done, total)


def certify_selector(
    estimator: nn.Module,
    experts: Sequence[nn.Module],
    x: torch.Tensor,
    *,
    sigmas: Sequence[float],
    sigma_e: float,
    num_classes: int,
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
) -> Certificate:
    """The σ selector's CERTIFY (module doc): radius min(R_σ, R_c) at level 1 − α, α split
    in half between the stages; each stage is `smoothing.certify` with the same n0, n,
    bound and sampling. The certificate's own fields are the classifier stage's (σ = σ_i,
    its n_a and bounds, computed at α/2) but for `alpha` (the whole α), `radius`, `seed`
    (the run's) and `samples`/`seconds` (both stages); `selector` records both stages. When
    the estimator abstains, the abstention carries the estimator's fields (σ = σ_e).
    """
    sigmas = check_selector(sigmas, sigma_e, experts)
    half = alpha / 2
    started = time.perf_counter()
    source = seed_source(seed, generator)
    seed, (s_e, s_c) = _streams(seed, generator)
    common = dict(n0=n0, n=n, alpha=half, bound=bound, sampling=sampling, tolerance=tolerance,
                  target_radius=target_radius, batch_size=batch_size, cancel=cancel)
    first = certify(estimator, x, num_classes=len(sigmas), sigma=sigma_e, progress=_progress(progress, True),
                    **common, **s_e).replace(seed_source=source)
    record = dict(sigmas=sigmas, sigma_e=float(sigma_e), alpha_sigma=half, alpha_class=half, estimator=first)
    if first.abstained:
        return first.replace(alpha=alpha, seed=seed, seed_source=source, seconds=time.perf_counter() - started,
                             selector=SelectorRecord(sigma_index=None, radius_sigma=0.0, radius_class=None,
                                                     classifier_seed=None, **record))
    index = first.prediction
    expert = experts[index] if len(experts) > 1 else experts[0]
    second = certify(expert, x, num_classes=num_classes, sigma=sigmas[index], progress=_progress(progress, False),
                     **common, **s_c)
    radius = min(first.radius, second.radius) if not second.abstained else 0.0
    return second.replace(
        radius=radius, alpha=alpha, seed=seed, seed_source=source, samples=first.samples + second.samples,
        seconds=time.perf_counter() - started,
        selector=SelectorRecord(sigma_index=index, radius_sigma=first.radius,
                                radius_class=second.radius if not second.abstained else None,
                                classifier_seed=second.seed, **record),
    )


def predict_selector(
    estimator: nn.Module,
    experts: Sequence[nn.Module],
    x: torch.Tensor,
    *,
    sigmas: Sequence[float],
    sigma_e: float,
    num_classes: int,
    n: int = 10_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    progress: StageProgress | None = None,
    cancel: CancelCheck | None = None,
) -> Prediction:
    """The σ selector's PREDICT (module doc): PREDICT the estimator at α/2, then the chosen
    level's classifier at α/2 with fresh samples; abstains when either does. The answer's
    fields are the classifier stage's (or the estimator's, when it abstained) but for
    `alpha`, `seed` and the totals; `selector` records both stages."""
    sigmas = check_selector(sigmas, sigma_e, experts)
    half = alpha / 2
    started = time.perf_counter()
    source = seed_source(seed, generator)
    seed, (s_e, s_c) = _streams(seed, generator)
    common = dict(n=n, alpha=half, batch_size=batch_size, cancel=cancel)
    first = predict(estimator, x, num_classes=len(sigmas), sigma=sigma_e, progress=_progress(progress, True),
                    **common, **s_e).replace(seed_source=source)
    record = dict(sigmas=sigmas, sigma_e=float(sigma_e), alpha_sigma=half, alpha_class=half, estimator=first,
                  radius_sigma=None, radius_class=None)
    if first.abstained:
        return first.replace(alpha=alpha, seed=seed, seed_source=source, seconds=time.perf_counter() - started,
                             selector=SelectorRecord(sigma_index=None, classifier_seed=None, **record))
    index = first.prediction
    expert = experts[index] if len(experts) > 1 else experts[0]
    second = predict(expert, x, num_classes=num_classes, sigma=sigmas[index], progress=_progress(progress, False),
                     **common, **s_c)
    return second.replace(alpha=alpha, seed=seed, seed_source=source, samples=first.samples + second.samples,
                          seconds=time.perf_counter() - started,
                          selector=SelectorRecord(sigma_index=index, classifier_seed=second.seed, **record))
