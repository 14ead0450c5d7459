"""The settings of a per-input σ search, as a request states them (docs/algorithms.md §3, §4).

Torch-free, so the API can validate a request's `sigma_search` with the engine's own rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from smoothcert import bounds

METHODS = ("ddrs", "insta")
MAX_STEPS = 10_000
MAX_SAMPLES = 4096


@dataclass(frozen=True)
class SigmaSearch:
    """A request for a per-input σ; None fields take the method's defaults."""

    method: str = "ddrs"
    steps: int | None = None
    lr: float | None = None
    samples: int | None = None
    init: float | None = None  # σ0; default: the model's default σ

    def resolved(self) -> SigmaSearch:
        """The same request with every default filled in and every field validated."""
        if self.method not in METHODS:
            raise bounds.InvalidParameters(
                f"sigma_search.method must be one of {', '.join(METHODS)}, got {self.method!r}"
            )
        defaults = {"ddrs": (100, 0.01, 64), "insta": (3, 0.0, 128)}[self.method]
        steps = defaults[0] if self.steps is None else self.steps
        lr = defaults[1] if self.lr is None else self.lr
        samples = defaults[2] if self.samples is None else self.samples
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_STEPS:
            raise bounds.InvalidParameters(f"sigma_search.steps must be an integer in [0, {MAX_STEPS}]")
        if isinstance(samples, bool) or not isinstance(samples, int) or not 2 <= samples <= MAX_SAMPLES:
            raise bounds.InvalidParameters(f"sigma_search.samples must be an integer in [2, {MAX_SAMPLES}]")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise bounds.InvalidParameters("sigma_search.lr must be a finite number ≥ 0")
        return SigmaSearch(self.method, steps, float(lr), samples, self.init)
