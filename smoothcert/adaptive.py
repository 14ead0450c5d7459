"""Adaptive sampling: an input-specific sample size, chosen from the selection sample alone
(docs/algorithms.md §7; after Chen et al., "Input-Specific Robustness Certification for
Randomized Smoothing", AAAI 2022).

CERTIFY with `sampling="adaptive"` treats the request's `n` as a maximum, n_max:

1. Selection: n0 noisy votes, cA = their argmax, exactly as with a fixed n.
2. Plan (this module): from the selection counts only, pick the estimation size n from a
   fixed ladder {0} ∪ {n_max·2^(-k/4) ≥ n_min} ∪ {n_max} (n_min: the smallest n that can
   ever certify with the bound, `bounds.min_certify_n`). n = 0 is an early abstention.
3. Estimation: n *fresh* votes and the very same Clopper–Pearson bounds at level α as with a
   fixed n (`bounds.cohen_bound`, `two_sided_bound`, `drs_bounds`).

Why it is sound. The selection sample S0 and the estimation votes S are independent, and
both cA and n are functions of S0 only. Given S0, the n votes are i.i.d. with the fixed n the
Clopper–Pearson guarantee needs, so P(bound wrong | S0) ≤ α; averaging over S0 gives the
same ≤ α as a fixed n, for every bound and its α split. n = 0 abstains, and an abstention
claims nothing. Nothing looks at S before n is fixed: no bound is ever recomputed after
peeking (optional stopping would void the 1−α), and the selection counts never enter the
estimate (the ISS authors' published script adds them in: cA was chosen because its selection
count is high, and n because of that same count, so the sum is biased upwards;
tests/smoothcert/test_adaptive.py shows the soundness check catches that variant).

How n is chosen (efficiency only: any rule of S0 alone would be sound). The selection counts
give a Jeffreys posterior on the class probabilities (Beta(k+½, n0−k+½) for each count used).
For each ladder rung, the module computes under that posterior, taking the estimation count
at its mean n·p (its binomial spread is second order next to the posterior width of a
100-vote selection sample):

- E[R(n)]/σ, the expected radius in units of σ (0 for an abstention), and
- P(abstain at n).

It returns the smallest rung with

    E[R(n)] ≥ E[R(n_max)] − tolerance·σ    and    P(abstain at n) ≤ P(abstain at n_max) + ABSTENTION_SLACK.

The first condition is Chen et al.'s "radius decline" control, made robust to the selection
sample's uncertainty by averaging over the posterior instead of plugging in one estimate
(a unanimous selection sample cannot tell pA = 0.99 from 0.99999, and the latter needs n_max
to reach its n_max radius). The second keeps accuracy: a small certified radius is not
traded for an abstention, which would cost clean accuracy beyond what a radius tolerance
says; ABSTENTION_SLACK = 0.01 bounds that expected loss at one point. Rung 0 meets both only
when E[R(n_max)] ≤ tolerance·σ and the posterior makes an abstention at n_max at least
1 − ABSTENTION_SLACK likely: early abstention only when n_max would almost surely abstain too.

Both conditions hold at n_max, so n ≤ n_max always; a larger tolerance only loosens the
first, so n never grows with the tolerance.

The tolerance is relative to σ because the radius is σ times a margin that depends on the
vote probabilities only (σ·Φ⁻¹(pA_low), ...): the same tolerance means the same thing at
every σ and image size. DEFAULT_TOLERANCE = 0.05σ is Chen et al.'s headline setting (a radius
decline of 0.05 at σ = 1 on ImageNet, where absolute and σ-relative agree); it is 1.3% of the
largest radius n_max = 100,000 and α = 0.001 can certify (3.8σ), and the size of the seed-to-
seed spread of the n_max radius itself for pA between 0.999 and 0.9998 (0.03σ to 0.06σ). It
was set from those arguments, not fitted to a data set. (A design check on the digits
*training* split found the posterior average calibrated: a mean loss of 0.045σ at 0.05σ; a
uniform prior, which puts less weight on pA ≈ 1, lost 0.066σ.)

SciPy and NumPy only: the API validates `sampling` and `tolerance` with `check_sampling`
without loading torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import betaincinv, ndtri

from smoothcert import bounds

SAMPLINGS = ("fixed", "adaptive", "sequential")  # sequential: smoothcert.sequential
DEFAULT_TOLERANCE = 0.05  # expected radius loss allowed against n_max, in units of σ
MAX_TOLERANCE = 4.0  # above ~3.8 (the largest margin n = 10⁵, α = 0.001 allow) nothing changes
ABSTENTION_SLACK = 0.01  # extra abstention probability allowed against n_max
LADDER_STEP = 2.0 ** 0.25  # rungs per doubling: 4 (a rung overshoots the needed n by < 19%)
POSTERIOR_NODES = 64  # quantile nodes of the posterior
PRIOR = 0.5  # Jeffreys: Beta(k + ½, n0 − k + ½)
_LATTICE = 39  # coprime to POSTERIOR_NODES, ≈ 64/φ: pairs the two halves' nodes (DRS)


@dataclass(frozen=True)
class Plan:
    """The estimation size chosen from a selection sample, and why (margins in units of σ)."""

    n: int  # fresh estimation samples to draw; 0: abstain without estimating
    n_max: int
    tolerance: float
    expected_margin: float  # E[R(n)]/σ under the selection sample's posterior
    expected_margin_max: float  # E[R(n_max)]/σ
    abstain_probability: float  # P(abstain at n)
    abstain_probability_max: float  # P(abstain at n_max)


def check_sampling(sampling: str, tolerance: float | None) -> float | None:
    """Validate `sampling` and `tolerance`; the tolerance to use (the default for adaptive
    sampling when None; None for fixed and sequential sampling, which take no tolerance)."""
    if sampling not in SAMPLINGS:
        raise bounds.InvalidParameters(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    if sampling != "adaptive":
        if tolerance is not None:
            raise bounds.InvalidParameters("tolerance applies to sampling 'adaptive' only")
        return None
    if tolerance is None:
        return DEFAULT_TOLERANCE
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) \
            or not 0.0 <= tolerance <= MAX_TOLERANCE:
        raise bounds.InvalidParameters(
            f"tolerance (the expected radius loss allowed, in units of sigma) must be a number in "
            f"[0, {MAX_TOLERANCE:g}], got {tolerance!r}")
    return float(tolerance)


def ladder(n_max: int, n_min: int, *, early_abstention: bool = True) -> tuple[int, ...]:
    """The sizes adaptive sampling chooses from, ascending: 0 (abstain; not with
    `early_abstention=False`), the rungs round(n_max·2^(-k/4)) ≥ n_min, and n_max itself.
    Fixed before any sample is drawn."""
    rungs = {n_max}
    k = 1
    while (rung := round(n_max * LADDER_STEP ** -k)) >= n_min:
        rungs.add(rung)
        k += 1
    return (0, *sorted(rungs)) if early_abstention else tuple(sorted(rungs))


def plan(bound: str, c_a: int, counts0: Sequence[Sequence[int]], *, n_max: int, alpha: float,
         tolerance: float, tail: float = 0.0, n_floor: int = 0) -> Plan:
    """The estimation size for cA from the selection counts `counts0` (one count vector per
    network: one for cohen and two_sided, left and right for drs). See the module docstring.
    `tail` is the noise tail the bounds account for (smoothcert.noise); `n_floor` > 0 makes
    it the smallest size allowed, with no early abstention (a memory's minimum n for commits).

    Every posterior node's margin grows with n (a Clopper–Pearson bound at a fixed proportion
    tightens as n grows), so E[R(n)] rises and P(abstain at n) falls along the ladder, and
    the smallest rung that meets both conditions is found by bisection."""
    if bound not in bounds.BOUNDS:
        raise bounds.InvalidParameters(f"bound must be one of {', '.join(bounds.BOUNDS)}, got {bound!r}")
    nodes = _nodes(bound, c_a, counts0)
    rungs = ladder(n_max, max(n_floor, bounds.min_certify_n(alpha, bound, tail)), early_abstention=n_floor <= 0)

    def stats(n: int) -> tuple[float, float]:  # (E[R(n)]/σ, P(abstain at n))
        if n == 0:
            return 0.0, 1.0
        certifies, margin = margin_at(bound, nodes, float(n), alpha, len(counts0[0]) - 1, tail)
        with np.errstate(invalid="ignore"):
            return float(np.where(certifies, margin, 0.0).mean()), float(1.0 - certifies.mean())

    radius_max, abstain_max = stats(n_max)

    def enough(n: int) -> bool:
        radius, abstain = stats(n)
        return radius >= radius_max - tolerance - 1e-12 and abstain <= abstain_max + ABSTENTION_SLACK + 1e-12

    lo, hi = 0, len(rungs) - 1  # rungs[hi] = n_max always qualifies
    if enough(rungs[lo]):
        hi = lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(rungs[mid]) else (mid, hi)
    n = rungs[hi]
    radius, abstain = stats(n)
    return Plan(n=n, n_max=n_max, tolerance=float(tolerance), expected_margin=radius,
                expected_margin_max=radius_max, abstain_probability=abstain, abstain_probability_max=abstain_max)


def _nodes(bound: str, c_a: int, counts0: Sequence[Sequence[int]]) -> tuple[np.ndarray, ...]:
    """Posterior quantile nodes of the vote probabilities the bound uses: (pA,) for cohen;
    (pA, pB) for two_sided, pB the largest other class, paired antithetically (a
    multinomial's top two move in opposite directions); (pA left, pA right) for drs, paired
    by a rank-1 lattice (the halves vote independently)."""
    n0 = int(sum(counts0[0]))
    u = (np.arange(POSTERIOR_NODES) + 0.5) / POSTERIOR_NODES
    p_a = _posterior(int(counts0[0][c_a]), n0, u)
    if bound == "cohen":
        return (p_a,)
    if bound == "two_sided":
        others = [int(c) for i, c in enumerate(counts0[0]) if i != c_a]
        return (p_a, _posterior(max(others), n0, 1.0 - u) if others else np.zeros_like(p_a))
    lattice = u[(np.arange(POSTERIOR_NODES) * _LATTICE) % POSTERIOR_NODES]
    return (p_a, _posterior(int(counts0[1][c_a]), n0, lattice))


def margin_at(bound: str, nodes: tuple[np.ndarray, ...], n: float, alpha: float,
              others: int, tail: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(certifies, R/σ) at each node with the estimation count at its mean n·p, through the
    bound's own α split and strict condition (bounds.cohen_bound, two_sided_bound (`others`:
    whether cA has rivals at all), drs_bounds), the noise tail taken off lower bounds and added to upper
    ones. For planning only: the certificate's own bound is computed by `smoothcert.bounds`."""
    if bound == "cohen":
        p_low = _cp_lower(n * nodes[0], n, alpha) - tail
        return p_low > 0.5, ndtri(np.clip(p_low, 0.0, 1.0))
    if bound == "two_sided":
        p_a, p_b = nodes
        p_low = _cp_lower(n * p_a, n, alpha / 2.0) - tail
        p_up = _cp_upper(n * p_b, n, alpha / 2.0) + tail if others else np.zeros_like(p_low)
        p_low, p_up = np.clip(p_low, 0.0, 1.0), np.clip(p_up, 0.0, 1.0)
        return p_low > p_up, (ndtri(p_low) - ndtri(p_up)) / 2.0
    halves = [np.clip(_cp_lower(n * p, n, alpha / 2.0) - tail, 0.0, 1.0) for p in nodes]
    a_plus_b = ndtri(halves[0]) + ndtri(halves[1])
    return a_plus_b > 0.0, a_plus_b / math.sqrt(2.0)


def _posterior(k: int, n0: int, u: np.ndarray) -> np.ndarray:
    """Quantiles u of the Jeffreys posterior Beta(k + ½, n0 − k + ½) of a vote probability."""
    return betaincinv(k + PRIOR, n0 - k + PRIOR, u)


def _cp_lower(k: np.ndarray, n: np.ndarray, alpha: float) -> np.ndarray:
    """bounds.cp_lower for arrays, at real-valued counts (the posterior mean of a count)."""
    k = np.broadcast_to(k, np.broadcast_shapes(np.shape(k), np.shape(n)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(k > 0, betaincinv(np.maximum(k, 1e-300), n - k + 1.0, alpha), 0.0)


def _cp_upper(k: np.ndarray, n: np.ndarray, alpha: float) -> np.ndarray:
    """bounds.cp_upper for arrays, at real-valued counts."""
    k = np.broadcast_to(k, np.broadcast_shapes(np.shape(k), np.shape(n)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(k < n, betaincinv(k + 1.0, np.maximum(n - k, 1e-300), 1.0 - alpha), 1.0)
