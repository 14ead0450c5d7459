"""Frozen records of what the engine answered and every parameter that produced it.

A certificate carries its σ, bound, sample sizes, α, seed, search settings, numeric mode
and model digest, so it can be audited and re-derived: the same request with the same seed
on the same device gives the same record (but for `seconds`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Self

from smoothcert.modes import DEFAULT as DEFAULT_NUMERIC_MODE

OUTCOMES = ("new", "inside", "shrunk")


def memory_namespace(model_digest: str, numeric_mode: str = DEFAULT_NUMERIC_MODE) -> str:
    """The memory a certificate belongs to: one exact function, i.e. the model's content
    digest and the numeric mode it runs in (ALGORITHMS.md §3.1)."""
    return f"{model_digest}/{numeric_mode}"


@dataclass(frozen=True)
class SigmaSearchRecord:
    """How a per-input σ was chosen (ALGORITHMS.md §3, §4)."""

    method: str  # "ddrs" or "insta"
    sigma0: float
    sigma_min: float
    sigma_max: float
    steps: int  # ascent steps (per start, for insta)
    lr: float
    samples: int  # noisy copies per step / per radius estimate
    starts: tuple[float, ...]  # insta's starting σ values; () for ddrs
    samples_used: int  # forward passes spent on the search
    sigma: float  # the σ found


@dataclass(frozen=True)
class MemoryRecord:
    """What the memory rule (ALGORITHMS.md §3.1) did to a fresh certificate."""

    outcome: str  # "new", "inside" or "shrunk"
    prediction_before: int | None  # the fresh certificate's class (None: abstained or no sampling)
    radius_before: float | None  # the fresh certificate's radius; None when answered from memory
    entry: int | None  # index of the committed entry; None when answered from the memory
    conflict: int | None  # index of the entry that decided "inside" or "shrunk"


class _Answer:
    """What certificates and predictions share: abstention as a value, copy, plain dict."""

    prediction: int | None

    @property
    def abstained(self) -> bool:
        return self.prediction is None

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["abstained"] = self.abstained
        return out


@dataclass(frozen=True)
class Certificate(_Answer):
    """A certified prediction: class and ℓ2 radius, or an abstention (prediction None).

    `bound` is "cohen", "two_sided" or "drs"; the fields that belong to other bounds are
    None. A certificate answered from the memory has no sampling fields (n_a is None).
    `n` is the number of estimation samples the bound used; with `sampling` "adaptive" it
    was chosen from the selection sample, at most `n_max` (the request's n), and 0 for an
    early abstention (smoothcert.adaptive). With `sampling` "sequential" the bound is that of
    the look that gave the radius: `n` votes at level `look_alpha` (a share of α), while
    `samples` counts every vote drawn (smoothcert.sequential).
    """

    prediction: int | None
    radius: float
    sigma: float
    bound: str
    n0: int
    n: int
    alpha: float
    batch_size: int
    seed: int | None
    n_a: int | None = None
    p_a_lower: float | None = None
    p_b_upper: float | None = None  # two_sided
    runner_up: int | None = None  # two_sided
    n_a_halves: tuple[int, int] | None = None  # drs: (left, right)
    p_a_lower_halves: tuple[float, float] | None = None  # drs: (left, right)
    search: SigmaSearchRecord | None = None
    memory: MemoryRecord | None = None
    model_digest: str | None = None
    numeric_mode: str = DEFAULT_NUMERIC_MODE
    sampling: str = "fixed"  # "adaptive": n chosen from the selection sample; "sequential": looks
    n_max: int | None = None  # the largest n the request allowed (fixed sampling: n)
    tolerance: float | None = None  # adaptive: expected radius loss allowed, in units of σ
    target_radius: float | None = None  # sequential: the radius at which sampling stops
    look_alpha: float | None = None  # sequential: the level of the look whose bound is given
    samples: int = 0  # forward passes spent in all (search + n0 + n)
    seconds: float = 0.0


@dataclass(frozen=True)
class Prediction(_Answer):
    """PREDICT's answer: the smoothed class, or an abstention (prediction None).

    With probability ≥ 1−α the answer is not a class other than g(x).
    """

    prediction: int | None
    sigma: float
    n: int
    alpha: float
    batch_size: int
    seed: int
    n1: int  # top count
    n2: int  # runner-up count
    p_value: float
    bound: str = "binomial"
    model_digest: str | None = None
    numeric_mode: str = DEFAULT_NUMERIC_MODE
    samples: int = 0
    seconds: float = 0.0
