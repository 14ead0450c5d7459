"""The certificate memory that makes data-dependent σ sound (ALGORITHMS.md §3.1).

Invariant kept by `apply_rule` + commit: committed balls of different classes never
intersect (an abstention is its own class, ABSTAIN, with radius 0). Then "answer c_i if the
query lies in a committed ball B(x_i, R_i), else certify afresh" agrees with every
certificate ever issued. Distances are exact (float64, computed in blocks, no approximate
search); every radius the rule lowers is rounded down by a relative ROUNDING margin, so
floating-point error can only make a ball smaller, never let two balls touch.

`apply_rule` and `lookup` are pure functions over tensors; `Memory` is an append-only
in-process table built on them (the CLI's memory, and the workers' local copy of the
Redis log).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smoothcert.results import Certificate, MemoryRecord

ABSTAIN = -1
ROUNDING = 1e-9
BLOCK_ROWS = 4096


class MemoryFull(RuntimeError):
    """The memory holds its configured maximum of entries; nothing was committed."""


@dataclass(frozen=True)
class Decision:
    """The rule's answer for one candidate: class (ABSTAIN or ≥ 0), radius, outcome."""

    prediction: int
    radius: float
    outcome: str  # "new", "inside" or "shrunk"
    conflict: int | None  # the entry that decided "inside" or "shrunk"


def distances(points: torch.Tensor, x: torch.Tensor, block_rows: int = BLOCK_ROWS) -> torch.Tensor:
    """‖x − points_i‖₂ for every row of `points` [N, D], in float64, `block_rows` at a time."""
    x = x.reshape(-1).to(device=points.device, dtype=torch.float64)
    out = torch.empty(points.shape[0], dtype=torch.float64, device=points.device)
    for start in range(0, points.shape[0], block_rows):
        block = points[start:start + block_rows].to(torch.float64)
        out[start:start + block_rows] = torch.linalg.vector_norm(block - x, dim=1)
    return out


def _round_down(value: float) -> float:
    return max(0.0, value * (1.0 - ROUNDING))


def apply_rule(
    points: torch.Tensor, classes: torch.Tensor, radii: torch.Tensor,
    x: torch.Tensor, prediction: int, radius: float,
    dist: torch.Tensor | None = None,
) -> Decision:
    """Adjust the candidate certificate (x, prediction, radius) against committed entries.

    conflict = {i : c_i ≠ c and d_i < R_i + R}; none → "new". Otherwise with
    j = argmin over conflicts of d_j − R_j and m = d_j − R_j: m < 0 → x lies in ball j,
    answer (c_j, R_j − d_j) ("inside"); else shrink R to m ("shrunk"). No re-check is
    needed: m is the minimum over all conflicts. Pass `dist` to reuse computed distances.
    """
    if points.shape[0] == 0:
        return Decision(prediction, float(radius), "new", None)
    d = distances(points, x) if dist is None else dist
    r = radii.to(torch.float64)
    c = classes.to(device=d.device)
    # The (1 + ROUNDING) slack treats balls that touch up to rounding as intersecting.
    conflict = (c != prediction) & (d < (r + radius) * (1.0 + ROUNDING))
    if not bool(conflict.any()):
        return Decision(prediction, float(radius), "new", None)
    margin = torch.where(conflict, d - r, torch.full_like(d, float("inf")))
    j = int(torch.argmin(margin))
    m = float(margin[j])
    if m < 0:
        return Decision(int(c[j]), _round_down(float(r[j] - d[j])), "inside", j)
    # Exactly, a conflict means m < R; with the rounding slack m may exceed R by a hair, and
    # shrinking must never grow a radius.
    return Decision(prediction, _round_down(min(m, float(radius))), "shrunk", j)


def lookup(
    points: torch.Tensor, classes: torch.Tensor, radii: torch.Tensor, x: torch.Tensor
) -> tuple[int, float] | None:
    """(index, R_i − d_i) of the committed ball that contains x deepest, or None.

    All balls that contain x share one class, by the invariant.
    """
    if points.shape[0] == 0:
        return None
    d = distances(points, x)
    margin = radii.to(torch.float64) - d
    j = int(torch.argmax(margin))
    if float(margin[j]) <= 0:
        return None
    return j, _round_down(float(margin[j]))


def invariant_violations(points: torch.Tensor, classes: torch.Tensor, radii: torch.Tensor) -> int:
    """Number of pairs of committed balls of different classes that intersect (should be 0)."""
    d = torch.cdist(points.to(torch.float64), points.to(torch.float64))
    r = radii.to(torch.float64)
    touching = d < r[:, None] + r[None, :]
    different = classes[:, None] != classes[None, :]
    return int(torch.triu(touching & different, diagonal=1).sum())


class Memory:
    """An append-only table of committed certificates for one namespace.

    The namespace names the exact function the certificates are about: the model's digest
    and the numeric mode it runs in. Entries keep the input's dtype; `capacity` bounds the
    table and a full table raises MemoryFull rather than evicting anything.
    """

    def __init__(self, namespace: str, dim: int, *, capacity: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.namespace = namespace
        self.capacity = capacity
        self.points = torch.empty((0, dim), dtype=dtype, device=device)
        self.classes = torch.empty(0, dtype=torch.int64, device=device)
        self.radii = torch.empty(0, dtype=torch.float64, device=device)
        self.sigmas = torch.empty(0, dtype=torch.float64, device=device)

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def lookup(self, x: torch.Tensor) -> tuple[int, float] | None:
        """See `lookup`: the entry whose ball contains x, and the radius left around x."""
        return lookup(self.points, self.classes, self.radii, x)

    def decide(self, x: torch.Tensor, prediction: int, radius: float) -> Decision:
        """See `apply_rule`."""
        return apply_rule(self.points, self.classes, self.radii, x, prediction, radius)

    def commit(self, x: torch.Tensor, prediction: int, radius: float, sigma: float) -> int:
        """Append an entry the rule has cleared; returns its index."""
        if self.capacity is not None and len(self) >= self.capacity:
            raise MemoryFull(f"memory {self.namespace} holds its maximum of {self.capacity} entries")
        self.extend(x.reshape(1, -1), [prediction], [radius], [sigma])
        return len(self) - 1

    def extend(self, points: torch.Tensor, classes, radii, sigmas) -> None:
        """Append entries committed elsewhere (a worker's copy of the shared log), in one
        concatenation per call. The caller vouches that they were cleared by the rule."""
        dev = self.points.device
        self.points = torch.cat([self.points, points.reshape(len(points), -1).to(dev, self.points.dtype)])
        self.classes = torch.cat([self.classes, torch.as_tensor(classes, dtype=torch.int64, device=dev)])
        self.radii = torch.cat([self.radii, torch.as_tensor(radii, dtype=torch.float64, device=dev)])
        self.sigmas = torch.cat([self.sigmas, torch.as_tensor(sigmas, dtype=torch.float64, device=dev)])

    def answer(self, x: torch.Tensor, template: Certificate) -> Certificate | None:
        """The certificate the memory gives for x without sampling, or None if x lies in no
        committed ball. `template` supplies the request's parameters."""
        hit = self.lookup(x)
        if hit is None:
            return None
        j, radius = hit
        prediction = int(self.classes[j])
        return template.replace(
            prediction=None if prediction == ABSTAIN else prediction, radius=radius,
            sigma=float(self.sigmas[j]), samples=0,
            memory=MemoryRecord("inside", None, None, None, j),
        )

    def certify(self, x: torch.Tensor, certificate: Certificate) -> Certificate:
        """Apply the rule to a fresh certificate, commit it, and return the committed one."""
        before = ABSTAIN if certificate.prediction is None else certificate.prediction
        decision = self.decide(x, before, certificate.radius)
        entry = self.commit(x, decision.prediction, decision.radius, certificate.sigma)
        return certificate.replace(
            prediction=None if decision.prediction == ABSTAIN else decision.prediction,
            radius=decision.radius,
            memory=MemoryRecord(decision.outcome, certificate.prediction, certificate.radius,
                                entry, decision.conflict),
        )
