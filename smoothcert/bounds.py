"""Confidence bounds, certified radii and the parameter checks that go with them.

Pure SciPy and the standard library: no torch here, so the API process can validate a
request with the same rules the engine applies. Every function states the level at which it
holds; the α splits of each certificate (docs/algorithms.md §1, §2, §5) are made here and nowhere
else. Every number leaves here rounded in the safe direction (lower bounds and radii down,
upper bounds up: `round_down`, `round_up`), a radius is issued only when its bound's
condition holds strictly, and a radius is always finite (docs/guarantees.md §4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

from scipy.stats import beta, binomtest, norm

BOUNDS = ("cohen", "two_sided", "drs")


class InvalidParameters(ValueError):
    """A certification or prediction request that is malformed or can never succeed."""


# --- Rounding in the safe direction ------------------------------------------------------

# SciPy's beta quantile and normal quantile are accurate to a few hundred units in the last
# place at worst; a relative 2⁻⁴⁰ (~9e-13, ~4,000 ulps) is far beyond that, and far below
# anything a certificate can resolve (1 − pA_low ≥ 6.9e-6 at n = 10⁶, α = 0.001).
SAFETY = 2.0 ** -40


def round_down(value: float) -> float:
    """`value` lowered by a relative SAFETY, so that a bound or radius computed with rounding
    errors still errs on the safe side (never above the exact value); at least 0."""
    return max(0.0, value * (1.0 - SAFETY)) if value > 0 else max(0.0, value)


def round_up(value: float) -> float:
    """`value` raised by a relative SAFETY (a probability: at most 1)."""
    return min(1.0, value * (1.0 + SAFETY))


# --- Clopper–Pearson ---------------------------------------------------------------------


def cp_lower(k: int, n: int, alpha: float) -> float:
    """One-sided (1−α) Clopper–Pearson lower bound on p from k successes in n trials,
    rounded down (`round_down`): never above the exact bound, and always below 1."""
    if k <= 0:
        return 0.0
    return round_down(float(beta.ppf(alpha, k, n - k + 1)))


def cp_upper(k: int, n: int, alpha: float) -> float:
    """One-sided (1−α) Clopper–Pearson upper bound on p from k successes in n trials,
    rounded up: never below the exact bound."""
    if k >= n:
        return 1.0
    return round_up(float(beta.ppf(1.0 - alpha, k + 1, n - k)))


# --- Radii --------------------------------------------------------------------------------
#
# Each radius is computed from the bounds and then lowered by SAFETY times the size of its
# terms, so that rounding in Φ⁻¹ and the products can only make it smaller. Each abstains
# unless its condition holds strictly; a radius is always finite (the bounds lie strictly
# inside (0, 1) once rounded: `cp_lower` < 1, and an upper bound of 1 makes Φ⁻¹(pB) = ∞, which
# the strict comparison turns into an abstention before Φ⁻¹ is taken).


def cohen_radius(sigma: float, p_a_lower: float) -> float | None:
    """Cohen et al. radius σ·Φ⁻¹(pA_low); None (abstain) unless pA_low > 1/2."""
    if not 0.5 < p_a_lower < 1.0:
        return None
    a = float(norm.ppf(p_a_lower))
    return _safe(sigma * a, sigma * a)


def two_sided_radius(sigma: float, p_a_lower: float, p_b_upper: float) -> float | None:
    """σ/2·(Φ⁻¹(pA_low) − Φ⁻¹(pB_up)); None (abstain) unless pA_low > pB_up. With a single
    class (pB_up = 0, Φ⁻¹ = −∞) the radius is Cohen's σ·Φ⁻¹(pA_low), smaller and finite."""
    if not p_a_lower > p_b_upper or not p_a_lower < 1.0:
        return None
    a = float(norm.ppf(p_a_lower))
    if p_b_upper <= 0.0:  # no other class can win: R = σ·Φ⁻¹(pA_low) needs pA_low > 1/2
        return cohen_radius(sigma, p_a_lower)
    b = float(norm.ppf(p_b_upper))
    return _safe(sigma / 2.0 * (a - b), sigma / 2.0 * (abs(a) + abs(b)))


def drs_radius(sigma: float, p_a_lower_left: float, p_a_lower_right: float) -> float | None:
    """Dual smoothing radius σ/√2·(a+b), a, b = Φ⁻¹ of each half's bound; None unless a+b > 0.

    Either bound may be 0 (Φ⁻¹ = −∞): then a+b = −∞ and the answer is an abstention. A
    negative half term is never clamped to zero (docs/algorithms.md §5 lists why that is unsound).
    """
    if not (p_a_lower_left < 1.0 and p_a_lower_right < 1.0):
        return None
    a, b = float(norm.ppf(p_a_lower_left)), float(norm.ppf(p_a_lower_right))
    if not a + b > 0.0:
        return None
    return _safe(sigma / math.sqrt(2.0) * (a + b), sigma / math.sqrt(2.0) * (abs(a) + abs(b)))


def _safe(radius: float, scale: float) -> float:
    # The computed radius less SAFETY times the size of its terms (cancellation in a − b
    # leaves an error relative to the terms, not to the difference), never negative.
    if not math.isfinite(radius):
        raise ArithmeticError(f"a radius came out non-finite ({radius}); the bounds must lie inside (0, 1)")
    return max(0.0, radius - SAFETY * (abs(scale) + abs(radius)))


# --- The α split of each certificate ---------------------------------------------------


def cohen_bound(n_a: int, n: int, alpha: float, tail: float = 0.0) -> float:
    """pA_low for Cohen's certificate: the whole α on one lower bound, less the noise tail
    `tail` (smoothcert.noise: a bound on pA under exact Gaussian noise), rounded down."""
    return _less(cp_lower(n_a, n, alpha), tail)


def two_sided_bound(counts: Sequence[int], c_a: int, alpha: float, tail: float = 0.0) -> tuple[float, float, int]:
    """(pA_low, pB_up, cB) for the two-sided certificate, jointly valid with prob. ≥ 1−α.

    α/2 goes to pA_low and α/2 to pB_up, which must bound the probability of *every* class
    other than cA, because the runner-up an attacker can promote is whichever class is largest
    there: pB_up = max over all c ≠ cA of CP_upper(n_c, n, α/2), cB the class attaining it.
    Why one α/2 is enough for the K−1 classes, without a union bound over them: cA is fixed by
    the selection sample, so c* = argmax_{c≠cA} p_c is a fixed class, and if some class had
    p_c > pB_up then p_c* ≥ p_c > pB_up ≥ CP_upper(n_c*) — that one fixed class's bound failed,
    which has probability ≤ α/2 (docs/algorithms.md §2). What is NOT enough is bounding only
    the runner-up seen in the selection sample: it need not be c* (tests/smoothcert/
    test_power.py shows the check catching that). The noise tail is taken off pA_low and added
    to pB_up.
    """
    n = int(sum(counts))
    k = len(counts)
    p_a_lower = _less(cp_lower(int(counts[c_a]), n, alpha / 2.0), tail)
    others = [c for c in range(k) if c != c_a]
    if not others:
        return p_a_lower, 0.0, -1
    uppers = {c: cp_upper(int(counts[c]), n, alpha / 2.0) for c in others}
    c_b = max(others, key=lambda c: (uppers[c], -c))
    return p_a_lower, round_up(uppers[c_b] + tail) if tail else uppers[c_b], c_b


def drs_bounds(n_a_left: int, n_a_right: int, n: int, alpha: float, tail: float = 0.0) -> tuple[float, float]:
    """(pA_low_left, pA_low_right), each at level α/2 so that both hold with prob. ≥ 1−α,
    each less the noise tail of its half."""
    return _less(cp_lower(n_a_left, n, alpha / 2.0), tail), _less(cp_lower(n_a_right, n, alpha / 2.0), tail)


def _less(p_lower: float, tail: float) -> float:
    return round_down(p_lower - tail) if tail else p_lower


def predict_pvalue(n1: int, n2: int) -> float:
    """Two-sided binomial test p-value that the top two counts n1 ≥ n2 are equally likely."""
    if n1 + n2 == 0:
        return 1.0
    return float(binomtest(int(n1), int(n1 + n2), 0.5).pvalue)


# --- Feasibility ------------------------------------------------------------------------


@lru_cache(maxsize=1024)  # the API checks every request with it; scipy's ppf costs ~0.2 ms
def min_certify_n(alpha: float, bound: str = "cohen", tail: float = 0.0) -> int:
    """Smallest n with which the certificate can ever be issued (all n votes for cA): the
    bound's own condition must hold strictly (cohen: pA_low > 1/2; two_sided: pA_low >
    pB_up; drs: a + b > 0), with the noise tail `tail` accounted.

    Without a tail: cohen needs α^(1/n) > 1/2, i.e. n > log2(1/α) (n ≥ 10 at α = 0.001; at
    α = 2⁻¹⁰, n = 10 gives exactly 1/2, radius 0, and is refused); drs needs n > log2(2/α).
    """
    _check_alpha(alpha)
    if bound not in BOUNDS:
        raise InvalidParameters(f"bound must be one of {', '.join(BOUNDS)}, got {bound!r}")
    hi = max(1, math.ceil(1.0 - math.log2(alpha)))  # log2(2/α) without computing α/2 (it may underflow)
    while not _can_certify(hi, alpha, bound, tail):
        hi *= 2
        if hi > 2**40:
            raise InvalidParameters(f"no n can certify at alpha={alpha} with a noise tail of {tail}")
    lo = 0  # the condition grows with n: bisect for the smallest n that meets it
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _can_certify(mid, alpha, bound, tail) else (mid, hi)
    return hi


@lru_cache(maxsize=1024)
def min_predict_n(alpha: float) -> int:
    """Smallest n at which a unanimous vote passes PREDICT's test: 2·0.5^n ≤ α (11 at 0.001)."""
    _check_alpha(alpha)
    n = 1
    while predict_pvalue(n, 0) > alpha:
        n += 1
    return n


def _can_certify(n: int, alpha: float, bound: str, tail: float) -> bool:
    # Every vote for cA: does the bound's own radius function certify?
    if bound == "cohen":
        return cohen_radius(1.0, cohen_bound(n, n, alpha, tail)) is not None
    if bound == "two_sided":
        p_a, p_b, _ = two_sided_bound([n, 0], 0, alpha, tail)
        return two_sided_radius(1.0, p_a, p_b) is not None
    return drs_radius(1.0, *drs_bounds(n, n, n, alpha, tail)) is not None


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0.0 < alpha < 1.0):
        raise InvalidParameters(f"alpha must lie strictly between 0 and 1, got {alpha!r}")


def _check_count(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidParameters(f"{name} must be an integer ≥ {minimum}, got {value!r}")


def check_sigma(sigma: float, low: float | None = None, high: float | None = None) -> None:
    """σ must be finite and positive, and inside [low, high] when the model gives bounds."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma):
        raise InvalidParameters(f"sigma must be a finite number, got {sigma!r}")
    if sigma <= 0:
        raise InvalidParameters(f"sigma must be positive, got {sigma}")
    if low is not None and sigma < low or high is not None and sigma > high:
        raise InvalidParameters(f"sigma {sigma} is outside the model's range [{low}, {high}]")


def check_certify(n0: int, n: int, alpha: float, batch_size: int | None, bound: str = "cohen",
                  tail: float = 0.0) -> None:
    """Reject a CERTIFY request that is malformed or that can never issue a certificate
    (`min_certify_n` with the same noise tail)."""
    if bound not in BOUNDS:
        raise InvalidParameters(f"bound must be one of {', '.join(BOUNDS)}, got {bound!r}")
    _check_alpha(alpha)
    _check_count("n0", n0)
    _check_count("n", n)
    if batch_size is not None:  # None: the automatic batch size, chosen where the model runs
        _check_count("batch_size", batch_size)
    need = min_certify_n(alpha, bound, tail)
    if n < need:
        raise InvalidParameters(
            f"n={n} can never certify at alpha={alpha} with the {bound} bound: even if all n "
            f"samples vote for the top class the bound's condition does not hold strictly "
            f"(cohen: pA_lower > 1/2); use n ≥ {need}"
        )


def check_predict(n: int, alpha: float, batch_size: int | None) -> None:
    """Reject a PREDICT request whose n can never pass the binomial test at level α."""
    _check_alpha(alpha)
    _check_count("n", n)
    if batch_size is not None:  # None: the automatic batch size, chosen where the model runs
        _check_count("batch_size", batch_size)
    need = min_predict_n(alpha)
    if n < need:
        raise InvalidParameters(
            f"n={n} can never predict at alpha={alpha}: even a unanimous vote has binomial "
            f"p-value 2·0.5^n > alpha, so PREDICT would always abstain; use n ≥ {need}"
        )
