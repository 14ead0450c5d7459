"""Sequential sampling toward a target radius: stop as soon as the outcome is decided, with
the 1−α guarantee kept over a fixed schedule of looks (docs/algorithms.md §7).

CERTIFY with `sampling="sequential"` and a target radius r* treats the request's `n` as a
maximum, n_max:

1. Selection: n0 noisy votes, cA = their argmax, exactly as with a fixed n.
2. Estimation in looks. Fresh votes are drawn as one stream. At the cumulative sizes
   n_1 < n_2 < … < n_K = n_max (`schedule`: n_max·2^(-k), the smallest ≥ FIRST_LOOK) the
   certificate's own bound (`bounds.cohen_bound`, `two_sided_bound`, `drs_bounds`, with their
   α splits) is computed on all votes so far at that look's level α_k, Σ α_k = α.
3. Stop at the first look where the radius reaches r* (certified: decided), or where even
   the most favourable continuation could not reach r* by n_max (`futile`: decided the other
   way, which includes an early abstention when cA can no longer be shown to win), or at n_K.
   The certificate is the largest radius any look gave, with the (n, α_k) of that look; an
   abstention when no look certified.

Why it is sound. Given the selection sample, the votes form one i.i.d. stream, and look k's
bound is a fixed-n Clopper–Pearson bound on its first n_k votes: wrong with probability at
most α_k. By the union bound every look's bound holds at once with probability at least
1 − Σ α_k = 1 − α, *whatever rule decides when to stop*, so the radius of any look taken,
and the largest of them, is sound. The looks and their levels are fixed before any
estimation vote is drawn (they depend on n_max, α, the bound and r*/σ only). What is never
done: recomputing a bound at the full α after peeking at the votes. That is optional
stopping, and its error rate exceeds α (tests/smoothcert/test_sequential.py shows that the
soundness check catches it).

Spending. FINAL_SHARE of α goes to the last look, so an input that needs every sample gives
up little against a fixed n (at α = 0.001 a Clopper–Pearson bound at α/2 is ~6% wider, a
radius ~0.01σ smaller near the top of the range). The rest is split evenly over the earlier
looks that could reach r* at all, that is with every vote for cA at their share; the others
(too few votes for r*) only test futility and get α_k = 0.

Futility uses an optimistic guess, the votes' Clopper–Pearson bound on the favourable side at
level FUTILITY_LEVEL, placed at n_max: if even that cannot reach r*, the look stops. It decides
only how many samples are spent, never a radius (a futility stop reports the radius the
looks so far gave), so its level is about efficiency, not soundness: with probability at
most ~FUTILITY_LEVEL per look the guess is too pessimistic and a certificate that n_max votes
might have reached r* stops short of it.

SciPy and NumPy only: the API validates `target_radius` with `check_target` without torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from smoothcert import bounds
from smoothcert.adaptive import margin_at

FINAL_SHARE = 0.5  # share of α spent on the last look (n_max)
FIRST_LOOK = 64  # no look smaller than this (a look costs a bound computation, ~0.1 ms)
FUTILITY_LEVEL = 1e-3  # how optimistic the futility guess is (efficiency only)
MAX_TARGET_RADIUS = 1e6  # a finite, generous cap: larger targets are typos, not requests


@dataclass(frozen=True)
class Schedule:
    """The looks of one sequential certification, fixed before its estimation votes."""

    sizes: tuple[int, ...]  # cumulative estimation sizes, ascending; the last is n_max
    alphas: tuple[float, ...]  # each look's level; 0 for a futility-only look; sum = α
    target_margin: float  # r*/σ
    tail: float = 0.0  # the noise tail the bounds account for (smoothcert.noise)


def check_target(sampling: str, target_radius: float | None) -> float | None:
    """Validate `target_radius` against `sampling`: required with "sequential" (a finite
    number ≥ 0, in the units of the radius), rejected otherwise. Returns it as a float."""
    if sampling != "sequential":
        if target_radius is not None:
            raise bounds.InvalidParameters("target_radius applies to sampling 'sequential' only")
        return None
    if target_radius is None:
        raise bounds.InvalidParameters(
            "sampling 'sequential' needs target_radius: the l2 radius at which the outcome is decided")
    if isinstance(target_radius, bool) or not isinstance(target_radius, (int, float)) \
            or not math.isfinite(target_radius) or not 0.0 <= target_radius <= MAX_TARGET_RADIUS:
        raise bounds.InvalidParameters(
            f"target_radius must be a number in [0, {MAX_TARGET_RADIUS:g}], got {target_radius!r}")
    return float(target_radius)


def schedule(bound: str, *, n_max: int, alpha: float, target_margin: float, num_classes: int,
             tail: float = 0.0, first_look: int = FIRST_LOOK) -> Schedule:
    """The looks for a target margin r*/σ. See the module docstring for the spending rule.
    No look is smaller than `first_look` (a memory's minimum n for commits raises it), so
    sampling never stops before that many votes."""
    sizes = [n_max]
    while (size := n_max >> len(sizes)) >= max(FIRST_LOOK, first_look):
        sizes.append(size)
    sizes.reverse()
    earlier = sizes[:-1]
    # The largest m for which the m largest earlier looks can all reach r* at an equal share;
    # reachability only improves with the size, so the spenders are a top segment.
    spenders = 0
    for m in range(len(earlier), 0, -1):
        share = (1.0 - FINAL_SHARE) * alpha / m
        if _reaches(bound, earlier[-m], share, target_margin, num_classes, tail):
            spenders = m
            break
    final = alpha if spenders == 0 else FINAL_SHARE * alpha
    share = (alpha - final) / spenders if spenders else 0.0
    alphas = [0.0] * (len(earlier) - spenders) + [share] * spenders + [final]
    return Schedule(sizes=tuple(sizes), alphas=tuple(alphas), target_margin=float(target_margin), tail=tail)


def futile(bound: str, c_a: int, counts: Sequence[np.ndarray], plan: Schedule) -> bool:
    """Whether even a favourable continuation of these votes (each probability the bound uses
    at its FUTILITY_LEVEL Clopper–Pearson bound on the favourable side) could not reach
    the target margin at n_max with the last look's level."""
    n = int(counts[0].sum())
    if n == 0:
        return False
    if bound == "two_sided":
        others = [int(c) for i, c in enumerate(counts[0]) if i != c_a]
        nodes = (bounds.cp_upper(int(counts[0][c_a]), n, FUTILITY_LEVEL),
                 bounds.cp_lower(max(others), n, FUTILITY_LEVEL) if others else 0.0)
    else:  # cohen: pA; drs: pA of each half
        nodes = tuple(bounds.cp_upper(int(c[c_a]), n, FUTILITY_LEVEL) for c in counts)
    certifies, margin = margin_at(bound, tuple(np.array([p]) for p in nodes), float(plan.sizes[-1]),
                                  plan.alphas[-1], len(counts[0]) - 1, plan.tail)
    return not (bool(certifies[0]) and float(margin[0]) >= plan.target_margin)


def _reaches(bound: str, n: int, alpha: float, target_margin: float, num_classes: int, tail: float = 0.0) -> bool:
    """Whether n votes, all for cA, give a margin ≥ target at level α."""
    nodes = (np.ones(1), np.zeros(1)) if bound == "two_sided" else \
        (np.ones(1),) * (2 if bound == "drs" else 1)
    certifies, margin = margin_at(bound, nodes, float(n), alpha, num_classes - 1, tail)
    return bool(certifies[0]) and float(margin[0]) >= target_margin
