"""Frozen records of what the engine answered and every parameter that produced it.

A certificate carries its σ, bound, sample sizes, α, seed, search settings, numeric mode
and model digest, so it can be audited and re-derived: the same request with the same seed
on the same device gives the same record (but for `seconds`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Self

from smoothcert.modes import DEFAULT as DEFAULT_NUMERIC_MODE

OUTCOMES = ("new", "inside", "shrunk")
SEED_SOURCES = ("caller", "drawn", "server")  # drawn: by the engine; server: by the service, never shown before the end


def memory_namespace(model_digest: str, numeric_mode: str, device_type: str, alpha: float) -> str:
    """The memory a certificate belongs to: one exact function at one level. The function is
    the model's content digest in a numeric mode on a device type (fp32 on a CPU and on a GPU
    round differently: different functions); the level is α, so that a lax certificate never
    answers for a strict one (docs/guarantees.md §2). n, n0 and the bound do not change a
    certificate's level and stay out of it. `repr(α)` names the float exactly."""
    return f"{model_digest}/{numeric_mode}/{device_type}/{float(alpha)!r}"


def parse_namespace(namespace: str) -> tuple[str, str, str, float]:
    """(digest, numeric mode, device type, α) of a `memory_namespace`."""
    digest, mode, device, alpha = namespace.rsplit("/", 3)
    return digest, mode, device, float(alpha)


@dataclass(frozen=True)
class SigmaSearchRecord:
    """How a per-input σ was chosen (docs/algorithms.md §3, §4)."""

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
class RemoteRecord:
    """The remote base classifier a certificate is about (smoothcert.remote): where it was
    served, and the digest of its answers to the canary inputs, checked before, during and
    after the job."""

    endpoint: str
    model: str
    version: str | None
    canary_digest: str | None


@dataclass(frozen=True)
class Provenance:
    """The sampling that produced a committed ball: the root certificate (a "new" or
    "shrunk" entry, whose own votes gave the radius the ball was cut from). An "inside" entry
    carries its root's provenance, so every answer can be re-derived from one sampling run:
    radius ≤ noise_sigma·Φ⁻¹(p_a_lower) (cohen; two_sided and drs by their own formulas) at
    level `level`, minus the distance from the root's point."""

    root: int | None  # the root entry's index; None until committed (a fresh certificate)
    sigma: float
    bound: str
    n0: int
    n: int
    alpha: float  # the certificate's level (the memory's α)
    level: float  # the level of the bound that gave the radius: α, or a sequential look's share
    sampling: str
    p_a_lower: float | None = None
    p_b_upper: float | None = None
    p_a_lower_halves: tuple[float, float] | None = None
    noise_sigma: float | None = None
    noise_tail: float = 0.0
    job: str | None = None  # the service job that sampled it (None in the engine)

    @classmethod
    def of(cls, cert: Certificate, root: int | None = None, job: str | None = None) -> Provenance:
        """The provenance of a fresh certificate's own sampling."""
        return cls(root=root, sigma=cert.sigma, bound=cert.bound, n0=cert.n0, n=cert.n, alpha=cert.alpha,
                   level=cert.look_alpha if cert.look_alpha is not None else cert.alpha, sampling=cert.sampling,
                   p_a_lower=cert.p_a_lower, p_b_upper=cert.p_b_upper, p_a_lower_halves=cert.p_a_lower_halves,
                   noise_sigma=cert.noise_sigma, noise_tail=cert.noise_tail, job=job)

    def fields(self) -> dict[str, Any]:
        """The Certificate fields this provenance fills (an answer reports its root's sampling)."""
        return dict(sigma=self.sigma, bound=self.bound, n0=self.n0, n=self.n, alpha=self.alpha,
                    sampling=self.sampling, look_alpha=self.level if self.sampling == "sequential" else None,
                    p_a_lower=self.p_a_lower, p_b_upper=self.p_b_upper, p_a_lower_halves=self.p_a_lower_halves,
                    noise_sigma=self.noise_sigma, noise_tail=self.noise_tail, n_a=None, n_a_halves=None,
                    runner_up=None, n_max=None, tolerance=None, target_radius=None, search=None)


@dataclass(frozen=True)
class SelectorRecord:
    """Both stages of a σ selector's answer (smoothcert.selector, docs/algorithms.md §9): the
    estimator's own certificate (or prediction) over the levels, at `alpha_sigma`, and the
    classifier stage's level, seed and radius, at `alpha_class`; α = alpha_sigma + alpha_class.
    A certificate's radius is min(radius_sigma, radius_class)."""

    sigmas: tuple[float, ...]  # Σ, the levels the estimator chooses among
    sigma_e: float  # the estimator's own smoothing level
    sigma_index: int | None  # the level chosen; None: the estimator abstained
    radius_sigma: float | None  # R_σ: the chosen level holds within it (None for a prediction)
    radius_class: float | None  # R_c: the classifier stage's radius (None: it did not certify)
    alpha_sigma: float
    alpha_class: float
    classifier_seed: int | None  # the classifier stage's noise (derived from the run's seed)
    estimator: Certificate | Prediction  # the estimator stage's own answer, its class an index into sigmas


@dataclass(frozen=True)
class MemoryRecord:
    """What the memory rule (docs/algorithms.md §3.1) did to a fresh certificate, or that the
    memory answered without sampling ("inside" with entry None)."""

    outcome: str  # "new", "inside" or "shrunk"
    prediction_before: int | None  # the fresh certificate's class (None: abstained or no sampling)
    radius_before: float | None  # the fresh certificate's radius; None when answered from memory
    entry: int | None  # index of the committed entry; None when answered from the memory
    conflict: int | None  # the entry that decided "inside" or "shrunk", or whose ball answered
    root: int | None = None  # the entry whose own sampling produced the ball (docs/guarantees.md §2)
    root_job: str | None = None  # the service job of that entry
    sigma_before: float | None = None  # this job's own σ, when it sampled
    namespace: str | None = None  # the memory (model digest/numeric mode/device/α)


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
    noise_sigma: float | None = None  # the σ the radius used: min(σ, σ as the noise dtype holds it)
    noise_tail: float = 0.0  # Gaussian mass the noise generator cannot draw, taken off the bounds
    seed_source: str | None = None  # "caller", "drawn" (by the engine) or "server"
    remote: RemoteRecord | None = None  # a remote base classifier: what was certified
    selector: SelectorRecord | None = None  # a σ selector: both stages (the fields above: the classifier's)
    samples: int = 0  # forward passes spent in all (search + n0 + n)
    seconds: float = 0.0

    def __post_init__(self):
        # The one promise no code path may break: a radius is a finite number ≥ 0.
        if not (isinstance(self.radius, (int, float)) and math.isfinite(self.radius) and self.radius >= 0):
            raise ValueError(f"a certificate's radius must be finite and ≥ 0, got {self.radius!r}")
        if self.prediction is None and self.radius != 0:
            raise ValueError("an abstention has radius 0")


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
    seed_source: str | None = None  # "caller", "drawn" (by the engine) or "server"
    remote: RemoteRecord | None = None  # a remote base classifier: what was asked
    selector: SelectorRecord | None = None  # a σ selector: both stages
    samples: int = 0
    seconds: float = 0.0
