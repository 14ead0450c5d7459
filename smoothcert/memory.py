"""The certificate memory that makes data-dependent σ sound (docs/algorithms.md §3.1).

Invariant kept by `apply_rule` + commit: committed balls of different classes never
intersect (an abstention is its own class, ABSTAIN, with radius 0). Then "answer c_i if the
query lies in a committed ball B(x_i, R_i), else certify afresh" agrees with every
certificate ever issued. Distances are exact (float64, computed in blocks, no approximate
search); every radius the rule lowers is rounded down by a relative ROUNDING margin, so
floating-point error can only make a ball smaller, never let two balls touch.

Each entry also keeps its provenance: the sampling of its root, the entry whose own votes
produced the ball ("new" and "shrunk" entries are their own roots; an "inside" entry takes
the root of the ball it lies in), and every answer reports that root's σ, n, α and bounds
(docs/guarantees.md §2). A `Memory` holds certificates of one level α and of at least
`min_n` estimation votes, and never a radius that is not a finite number ≥ 0.

`apply_rule` and `lookup` are pure functions over tensors: the brute-force scan, the
definition. `Memory` is an append-only in-process table (the CLI's memory, and the workers'
local copy of the Redis log) whose `decide` and `lookup` return exactly what those functions
return on its table, but compute exact distances only for entries that a lower bound does not
rule out (norms and distances to pivot entries, by the triangle inequality, with a margin for
rounding; see `Memory._candidates`), nearest first, and stop once no entry left can change
the answer.

Points are stored in their original dtype: a uint8 table stands for the float32 values
`u.to(torch.float32) / 255` (IEEE division is correctly rounded, so these are the very values
an 8-bit image decodes to, bit for bit), a quarter of float32. Every function here reads a
uint8 tensor of points that way (`point_values`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from smoothcert.adaptive import SAMPLINGS
from smoothcert.bounds import BOUNDS, InvalidParameters
from smoothcert.results import Certificate, MemoryRecord, Provenance

ABSTAIN = -1
ROUNDING = 1e-9
BLOCK_ELEMENTS = 1 << 18  # values converted to float64 at a time (2 MiB): no [N, D] float64 copy, ever
SCAN_ROWS = 1 << 16  # rows of the lower-bound scan at a time
FIRST_ROWS = 16  # rows of the first block of exact distances; blocks double up to the block size
PIVOTS = 8  # the first PIVOTS entries are the pivots
_UNIT = 2.0 ** -53  # unit roundoff of float64


class MemoryFull(RuntimeError):
    """The memory holds its configured maximum of entries; nothing was committed."""


# One entry's provenance (results.Provenance) as a fixed-size record: the columns the table
# keeps beside its points, and the bytes an entry of the shared log carries. NaN: absent.
# root -1: the entry itself (its index is only known once it is committed).
PROVENANCE = np.dtype([
    ("root", "<i8"), ("sigma", "<f8"), ("bound", "u1"), ("n0", "<i8"), ("n", "<i8"), ("alpha", "<f8"),
    ("level", "<f8"), ("sampling", "u1"), ("p_a", "<f8"), ("p_b", "<f8"), ("p_left", "<f8"),
    ("p_right", "<f8"), ("noise_sigma", "<f8"), ("noise_tail", "<f8"),
])


def provenance_record(p: Provenance) -> np.ndarray:
    """`p` as one PROVENANCE record (its job id travels separately)."""
    nan = math.nan
    halves = p.p_a_lower_halves or (nan, nan)
    return np.array([(
        -1 if p.root is None else p.root, p.sigma, BOUNDS.index(p.bound), p.n0, p.n, p.alpha, p.level,
        SAMPLINGS.index(p.sampling), nan if p.p_a_lower is None else p.p_a_lower,
        nan if p.p_b_upper is None else p.p_b_upper, halves[0], halves[1],
        nan if p.noise_sigma is None else p.noise_sigma, p.noise_tail,
    )], dtype=PROVENANCE)


def provenance_of(record: np.void, index: int | None, job: str | None = None) -> Provenance:
    """The Provenance of entry `index` from its PROVENANCE record (a root of -1, the entry
    itself, becomes `index`)."""
    def opt(name: str) -> float | None:
        value = float(record[name])
        return None if math.isnan(value) else value

    left, right = opt("p_left"), opt("p_right")
    root = int(record["root"])
    return Provenance(
        root=index if root < 0 else root, sigma=float(record["sigma"]), bound=BOUNDS[int(record["bound"])],
        n0=int(record["n0"]), n=int(record["n"]), alpha=float(record["alpha"]), level=float(record["level"]),
        sampling=SAMPLINGS[int(record["sampling"])], p_a_lower=opt("p_a"), p_b_upper=opt("p_b"),
        p_a_lower_halves=None if left is None else (left, right), noise_sigma=opt("noise_sigma"),
        noise_tail=float(record["noise_tail"]), job=job,
    )


@dataclass(frozen=True)
class Decision:
    """The rule's answer for one candidate: class (ABSTAIN or ≥ 0), radius, outcome."""

    prediction: int
    radius: float
    outcome: str  # "new", "inside" or "shrunk"
    conflict: int | None  # the entry that decided "inside" or "shrunk"


def point_values(points: torch.Tensor) -> torch.Tensor:
    """The values stored points stand for: uint8 u is float32(u)/255 (bit-exact), floats as they are."""
    if points.dtype == torch.uint8:
        return points.to(torch.float32) / 255
    return points


def to_uint8(points: torch.Tensor) -> torch.Tensor | None:
    """u (uint8, same shape) with `point_values(u) == points` exactly in every element, or None."""
    if points.dtype == torch.uint8:
        return points
    if not points.is_floating_point():
        return None
    # In float32, x = fl(u/255) gives fl(255·x) within 3e-5 of u: rounding finds u. Any other
    # dtype is scaled in float64. Either way the equality below decides, exactly.
    wide = points if points.dtype == torch.float32 else points.to(torch.float64)
    u = (wide * 255).round_().clamp_(0, 255).nan_to_num_(0).to(torch.uint8)
    back = point_values(u)
    same = back == points if points.dtype == torch.float32 else back.to(torch.float64) == wide
    return u if bool(same.all()) else None


def _row_distances(rows: torch.Tensor, x64: torch.Tensor) -> torch.Tensor:
    # The one place a distance is computed: the blocked scan and the pruned search both call
    # it, and torch reduces each row of a [B, D] tensor on its own, so a row's distance is the
    # same bits whichever block it sits in (tests/smoothcert/test_memory.py checks this).
    return torch.linalg.vector_norm(point_values(rows).to(torch.float64) - x64, dim=1)


def block_rows_for(dim: int) -> int:
    """Rows per block: BLOCK_ELEMENTS values, so that a block's float64 copy stays in cache."""
    return max(1, BLOCK_ELEMENTS // max(1, dim))


def distances(points: torch.Tensor, x: torch.Tensor, block_rows: int | None = None) -> torch.Tensor:
    """‖x − points_i‖₂ for every row of `points` [N, D], in float64, `block_rows` at a time
    (default `block_rows_for(D)`)."""
    block_rows = block_rows or block_rows_for(points.shape[1] if points.dim() == 2 else 1)
    x64 = x.reshape(-1).to(device=points.device, dtype=torch.float64)
    out = torch.empty(points.shape[0], dtype=torch.float64, device=points.device)
    for start in range(0, points.shape[0], block_rows):
        out[start:start + block_rows] = _row_distances(points[start:start + block_rows], x64)
    return out


def _round_down(value: float) -> float:
    return max(0.0, value * (1.0 - ROUNDING))


def _rule(d: torch.Tensor, r: torch.Tensor, c: torch.Tensor, prediction: int, radius: float) -> Decision:
    # The rule on given distances; `conflict` indexes these arrays.
    # The (1 + ROUNDING) slack treats balls that touch up to rounding as intersecting.
    conflict = (c != prediction) & (d < (r + radius) * (1.0 + ROUNDING))
    if not bool(conflict.any()):
        return Decision(prediction, float(radius), "new", None)
    margin = torch.where(conflict, d - r, torch.full_like(d, float("inf")))
    j = int(torch.argmin(margin))  # the first minimum
    m = float(margin[j])
    if m < 0:
        return Decision(int(c[j]), _round_down(float(r[j] - d[j])), "inside", j)
    # Exactly, a conflict means m < R; with the rounding slack m may exceed R by a hair, and
    # shrinking must never grow a radius.
    return Decision(prediction, _round_down(min(m, float(radius))), "shrunk", j)


def _deepest(d: torch.Tensor, r: torch.Tensor) -> tuple[int, float] | None:
    margin = r - d
    j = int(torch.argmax(margin))  # the first maximum
    if float(margin[j]) <= 0:
        return None
    return j, _round_down(float(margin[j]))


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
    return _rule(d, radii.to(torch.float64), classes.to(device=d.device), prediction, radius)


def lookup(
    points: torch.Tensor, classes: torch.Tensor, radii: torch.Tensor, x: torch.Tensor
) -> tuple[int, float] | None:
    """(index, R_i − d_i) of the committed ball that contains x deepest, or None.

    All balls that contain x share one class, by the invariant.
    """
    if points.shape[0] == 0:
        return None
    return _deepest(distances(points, x), radii.to(torch.float64))


def invariant_violations(points: torch.Tensor, classes: torch.Tensor, radii: torch.Tensor) -> int:
    """Number of pairs of committed balls of different classes that intersect (should be 0).

    Distances are the differences' norms in float64 (relative error ~D·2⁻⁵³), well inside
    the rule's ROUNDING margin. (torch.cdist's default switches to ‖a‖² + ‖b‖² − 2a·b above
    25 rows, whose cancellation errs by ~1e-6 relative on close points: it reported balls
    the rule had shrunk to touch up to ROUNDING as intersecting.)"""
    p = point_values(points).to(torch.float64)
    d = torch.cdist(p, p, compute_mode="donot_use_mm_for_euclid_dist")
    r = radii.to(torch.float64)
    touching = d < r[:, None] + r[None, :]
    different = classes[:, None] != classes[None, :]
    return int(torch.triu(touching & different, diagonal=1).sum())


class Memory:
    """An append-only table of committed certificates for one namespace.

    The namespace names the exact function the certificates are about and their level
    (results.memory_namespace: the model's digest, numeric mode, device type and α). Every
    entry is a certificate at level `alpha` (None: the first certificate certified fixes it);
    a certificate of another level is refused, so a lax certificate never answers for a
    strict one. A certificate whose estimation used fewer than `min_n` votes is refused too
    (an abstention committed for a few samples would shrink every later ball around it).
    `capacity` bounds the table and a full table raises MemoryFull rather than evicting.

    Each entry keeps its provenance (results.Provenance): the sampling of its root, the entry
    whose own votes produced the ball, so that every answer names one certificate an auditor
    can re-derive (docs/guarantees.md §2).

    Storage: with `dtype=None` (the default) points are kept as uint8 while every point is
    exactly float32(u)/255 (an 8-bit image), and the whole table turns float32 (4× the bytes)
    at the first point that is not; `dtype=torch.float32` or `torch.float64` fixes the table's
    dtype. A point the table cannot hold exactly is refused (ValueError), never rounded: a
    moved centre would certify a ball around a point nobody certified. The tensors grow by
    doubling, so appending one entry costs O(D), not a copy of the table.

    Beside each entry the table keeps, in float64, its norm and its distances to the pivots
    (the first PIVOTS entries), maintained as entries arrive; `decide` and `lookup` use them
    to skip entries whose distance provably exceeds their threshold.
    """

    def __init__(self, namespace: str, dim: int, *, alpha: float | None = None, min_n: int = 1,
                 capacity: int | None = None, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        if dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"a memory stores points as uint8/float32 (dtype None), float32 or float64, not {dtype}")
        self.namespace, self.dim, self.capacity = namespace, dim, capacity
        self.alpha, self.min_n = alpha, min_n
        self.device = torch.device(device)
        self.block_rows, self.scan_rows, self.first_rows = block_rows_for(dim), SCAN_ROWS, FIRST_ROWS
        # Relative error bound of every computed norm and distance, with a factor 16 to spare
        # (see `_candidates`); 5.5e-12 for D = 3072.
        self.slack_rate = 16 * (dim + 16) * _UNIT
        self.exact_rows = 0  # rows whose exact distance the last decide/lookup computed
        self._n = 0
        f64 = {"dtype": torch.float64, "device": self.device}
        self._points = torch.empty((0, dim), dtype=dtype or torch.uint8, device=self.device)
        self._classes = torch.empty(0, dtype=torch.int64, device=self.device)
        self._radii, self._norms = (torch.empty(0, **f64) for _ in range(2))
        self._provenance = np.empty(0, dtype=PROVENANCE)  # on the host: read once per answer
        self._pivots = torch.empty((0, dim), **f64)  # the values of entries 0 .. PIVOTS-1
        self._pivot_d = torch.empty((0, PIVOTS), **f64)  # [i, k]: ‖x_i − pivot_k‖
        self._pivot_norm = 0.0  # the largest pivot norm

    def __len__(self) -> int:
        return self._n

    # Views of the first len(self) rows (the buffers behind them are larger).
    @property
    def points(self) -> torch.Tensor:
        """The stored points [N, D]: uint8 (standing for u/255, see `point_values`) or float."""
        return self._points[:self._n]

    @property
    def classes(self) -> torch.Tensor:
        return self._classes[:self._n]

    @property
    def radii(self) -> torch.Tensor:
        return self._radii[:self._n]

    def provenance(self, index: int, job: str | None = None) -> Provenance:
        """Entry `index`'s provenance: its root's sampling (root resolved to an index)."""
        if not 0 <= index < self._n:
            raise IndexError(f"memory {self.namespace} has no entry {index}")
        return provenance_of(self._provenance[index], index, job)

    def root_of(self, index: int) -> int:
        """The root of entry `index`: itself for "new" and "shrunk" entries."""
        root = int(self._provenance[index]["root"])
        return index if root < 0 else root

    @property
    def norms(self) -> torch.Tensor:
        return self._norms[:self._n]

    @property
    def nbytes(self) -> int:
        """Bytes held by the table's buffers (grown ahead by doubling: rows not yet used count)."""
        return self._provenance.nbytes + sum(t.numel() * t.element_size() for t in (
            self._points, self._classes, self._radii, self._norms, self._pivot_d, self._pivots))

    # --- queries ------------------------------------------------------------------

    def lookup(self, x: torch.Tensor) -> tuple[int, float] | None:
        """See `lookup`: the entry whose ball contains x, and the radius left around x.
        Returns exactly what `lookup(self.points, self.classes, self.radii, x)` returns."""
        x64 = self._query(x)
        if x64 is None:
            self.exact_rows = self._n
            return lookup(self.points, self.classes, self.radii, x)
        # An entry with R_i ≤ 0 (an abstention) has margin R_i − d_i ≤ 0: never the answer.
        idx, low = self._candidates(x64, 0, lambda a, b: self._radii[a:b], lambda a, b: self._radii[a:b] > 0)
        if idx.numel() == 0:
            return None
        r = self._radii[idx]
        # Deepest first. low_i ≤ d̂_i and rounding is monotone, so fl(R_i − low_i) ≥ R_i − d̂_i,
        # the margin the scan computes: once the next key is below the best margin found (or
        # not positive), no entry left can be the scan's answer, nor tie with it.
        key = (r - low).nan_to_num_(nan=math.inf)
        order = torch.argsort(key, descending=True, stable=True)
        d = torch.empty_like(key)
        best, done, step = -math.inf, 0, min(self.first_rows, self.block_rows)
        while done < idx.numel():
            pos = order[done:done + step]
            d[pos] = self._distances_of(idx[pos], x64)
            best = max(best, float((r[pos] - d[pos]).max()))
            done, step = done + pos.numel(), min(2 * step, self.block_rows)
            if done < idx.numel():
                following = float(key[order[done]])
                if following < best or following <= 0:
                    break
        self.exact_rows = done
        sel = order[:done].sort().values  # back in table order: the scan's tie-break
        hit = _deepest(d[sel], r[sel])
        return None if hit is None else (int(idx[sel[hit[0]]]), hit[1])

    def decide(self, x: torch.Tensor, prediction: int, radius: float, start: int = 0) -> Decision:
        """See `apply_rule`, against the entries from `start` on (a worker re-applies the rule
        to the entries committed since it last looked). Returns exactly what `apply_rule` on
        those entries returns, with `conflict` an index into this table."""
        x64 = self._query(x)
        if x64 is None or start >= self._n:
            self.exact_rows = max(0, self._n - start)
            d = apply_rule(self.points[start:], self.classes[start:], self.radii[start:], x, prediction, radius)
            return d if d.conflict is None else replace(d, conflict=start + d.conflict)
        idx, low = self._candidates(
            x64, start,
            lambda a, b: (self._radii[a:b] + radius) * (1.0 + ROUNDING),  # as in `_rule`, bit for bit
            lambda a, b: self._classes[a:b] != prediction,  # same-class entries never conflict
        )
        if idx.numel() == 0:
            return Decision(prediction, float(radius), "new", None)
        r, c = self._radii[idx], self._classes[idx]
        threshold = (r + radius) * (1.0 + ROUNDING)
        # Nearest margin first. fl(low_i − R_i) ≤ d̂_i − R_i, the margin the scan computes:
        # once a conflict is found and the next key exceeds the smallest conflict margin, no
        # entry left can be the scan's argmin, nor tie with it. Without a conflict, all go.
        key = (low - r).nan_to_num_(nan=-math.inf)
        order = torch.argsort(key, stable=True)
        d = torch.empty_like(key)
        best, done, step = math.inf, 0, min(self.first_rows, self.block_rows)
        while done < idx.numel():
            pos = order[done:done + step]
            d[pos] = self._distances_of(idx[pos], x64)
            conflict = d[pos] < threshold[pos]
            if bool(conflict.any()):
                best = min(best, float((d[pos] - r[pos])[conflict].min()))
            done, step = done + pos.numel(), min(2 * step, self.block_rows)
            if done < idx.numel() and float(key[order[done]]) > best:
                break
        self.exact_rows = done
        sel = order[:done].sort().values  # back in table order: the scan's tie-break
        decision = _rule(d[sel], r[sel], c[sel], prediction, radius)
        return decision if decision.conflict is None else replace(decision, conflict=int(idx[sel[decision.conflict]]))

    def _query(self, x: torch.Tensor) -> torch.Tensor | None:
        # The query in float64 (exact), or None when a non-finite value would make the bounds
        # meaningless: the brute-force scan then answers, which is the definition anyway.
        x64 = x.reshape(-1).to(device=self.device, dtype=torch.float64)
        if x64.numel() != self.dim:
            raise ValueError(f"memory {self.namespace} holds points of {self.dim} values, not {x64.numel()}")
        return x64 if bool(torch.isfinite(x64).all()) else None

    def _candidates(self, x64: torch.Tensor, start: int, threshold, eligible) -> tuple[torch.Tensor, torch.Tensor]:
        """(ascending indices i ≥ start with eligible(i) that the bounds cannot place beyond
        threshold(i), their lower bounds low_i): every entry the brute-force scan could find
        with d̂_i < threshold_i, and for each a float64 low_i ≤ d̂_i.

        Why low_i ≤ d̂_i, the distance the scan computes, whatever order it sums in. The
        triangle inequality gives, for the true distance δ_i = ‖x − x_i‖,
            LB_i = max(|‖x‖ − ‖x_i‖|, max_k |‖x − p_k‖ − ‖x_i − p_k‖|) ≤ δ_i.
        Every norm and distance is computed in float64 from the exact values (uint8 → float32
        → float64 and float32 → float64 are exact): D differences, D squares, a sum in any
        order and a square root, each rounded once, so each is within e·(true value), with
        e = γ_{D+3} ≈ (D + 3)·2⁻⁵³ (Higham, Accuracy and Stability, §3-4). Each term of the
        computed LB̂_i is then at most (1 + u)(δ_i + e·N_i), N_i = ‖x‖ + ‖x_i‖ + 2·max_k ‖p_k‖
        (a + b for each pair compared), and d̂_i ≥ (1 − e)·δ_i, so d̂_i ≥ LB̂_i − 3e·N_i. We take
            low_i = LB̂_i − s·(N̂_i + 1),   s = `slack_rate` = 16(D + 16)·2⁻⁵³ ≥ 16e,
        computed in float64 (its few roundings are far below the spare 13e·N_i; the + 1 covers
        underflow). An entry is skipped only if low_i > threshold_i: then d̂_i > threshold_i,
        so it is no conflict (d̂_i < R_i + R is false) and no ball containing x (R_i − d̂_i < 0).
        A NaN bound compares false and is never skipped.
        """
        self.exact_rows = 0
        nx = float(torch.linalg.vector_norm(x64))
        p = self._pivots.shape[0]
        dx = distances(self._pivots, x64) if p else None
        s = self.slack_rate
        base = s * (nx + 2 * self._pivot_norm + 1)
        found, lows = [], []
        for a in range(start, self._n, self.scan_rows):
            b = min(a + self.scan_rows, self._n)
            norms = self._norms[a:b]
            slack, limit = norms * s + base, threshold(a, b)
            lb = (norms - nx).abs_()
            # The norm bound first, the pivots only for the rows it leaves: the same rows and
            # the same low_i as taking the maximum of all bounds at once (max is exact).
            keep = (eligible(a, b) & ~(lb - slack > limit)).nonzero().squeeze(1)
            lb, slack, limit = lb[keep], slack[keep], limit[keep]
            if p and keep.numel():
                pivots = (self._pivot_d.index_select(0, keep + a)[:, :p] - dx).abs_().amax(1)
                torch.maximum(lb, pivots, out=lb)
            low = lb - slack
            near = ~(low > limit)
            found.append(keep[near] + a)
            lows.append(low[near])
        if not found:
            empty = torch.empty(0, device=self.device)
            return empty.to(torch.int64), empty.to(torch.float64)
        return torch.cat(found), torch.cat(lows)

    def _distances_of(self, idx: torch.Tensor, x64: torch.Tensor) -> torch.Tensor:
        # Exact distances of at most block_rows entries, gathered.
        return _row_distances(self._points.index_select(0, idx), x64)

    # --- appending ----------------------------------------------------------------

    def commit(self, x: torch.Tensor, prediction: int, radius: float, provenance: Provenance) -> int:
        """Append an entry the rule has cleared; returns its index."""
        if self.capacity is not None and len(self) >= self.capacity:
            raise MemoryFull(f"memory {self.namespace} holds its maximum of {self.capacity} entries")
        self.extend(x.reshape(1, -1), [prediction], [radius], provenance_record(provenance))
        return len(self) - 1

    def extend(self, points: torch.Tensor, classes, radii, provenance: np.ndarray | Sequence[Provenance]) -> None:
        """Append entries committed elsewhere (a worker's copy of the shared log). `points`
        [B, D] are floats, or uint8 standing for u/255; `provenance` PROVENANCE records (or
        Provenance objects). The caller vouches that they were cleared by the rule.
        Non-finite points, and radii that are not finite and ≥ 0, are refused (ValueError)."""
        rows = points.reshape(points.shape[0], -1).to(self.device)
        if rows.shape[1] != self.dim:
            raise ValueError(f"memory {self.namespace} holds points of {self.dim} values, not {rows.shape[1]}")
        k, n = rows.shape[0], self._n
        c = torch.as_tensor(classes, dtype=torch.int64, device=self.device).reshape(-1)
        r = torch.as_tensor(radii, dtype=torch.float64, device=self.device).reshape(-1)
        if not isinstance(provenance, np.ndarray):
            provenance = np.concatenate([provenance_record(p) for p in provenance]) if len(provenance) \
                else np.empty(0, dtype=PROVENANCE)
        if not c.numel() == r.numel() == provenance.shape[0] == k:
            raise ValueError("points, classes, radii and provenance differ in length")
        if k == 0:
            return
        if rows.is_floating_point() and not bool(torch.isfinite(rows).all()):
            raise ValueError(f"memory {self.namespace} refuses a point with NaN or infinite values")
        if not bool((torch.isfinite(r) & (r >= 0)).all()):
            raise ValueError(f"memory {self.namespace} refuses a radius that is not a finite number ≥ 0")
        stored = self._storable(rows)
        self._grow(n + k)
        self._points[n:n + k] = stored
        self._classes[n:n + k], self._radii[n:n + k] = c, r
        self._provenance[n:n + k] = provenance
        self._index(n, n + k)
        self._n = n + k

    def _storable(self, rows: torch.Tensor) -> torch.Tensor:
        # `rows` in the table's dtype, exactly; a uint8 table turns float32 when it must.
        target = self._points.dtype
        if target == torch.uint8:
            u = to_uint8(rows)
            if u is not None:
                return u
            target = torch.float32
        out = point_values(rows).to(target)
        exact = rows.dtype in (torch.uint8, target) or bool((out.to(torch.float64) == rows.to(torch.float64)).all())
        if not exact:
            raise ValueError(f"memory {self.namespace} stores {target} points and this point is not one: "
                             "it would be rounded")
        if self._points.dtype != target:
            self._retype(target)
        return out

    def _grow(self, rows: int) -> None:
        size = self._points.shape[0]
        if rows <= size:
            return
        size = max(rows, 2 * size, 64)
        if self.capacity is not None:
            size = max(rows, min(size, self.capacity))
        n = self._n

        def grown(old: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
            new = torch.empty(shape, dtype=old.dtype, device=self.device)
            new[:n] = old[:n]
            return new

        self._points = grown(self._points, (size, self.dim))
        self._classes = grown(self._classes, (size,))
        self._radii, self._norms = (grown(t, (size,)) for t in (self._radii, self._norms))
        self._pivot_d = grown(self._pivot_d, (size, PIVOTS))
        provenance = np.empty(size, dtype=PROVENANCE)
        provenance[:n] = self._provenance[:n]
        self._provenance = provenance

    def _retype(self, dtype: torch.dtype) -> None:
        # The whole table in `dtype`, block by block (the values, and so the norms, stay).
        new = torch.empty((self._points.shape[0], self.dim), dtype=dtype, device=self.device)
        for a in range(0, self._n, self.block_rows):
            new[a:a + self.block_rows] = point_values(self._points[a:a + self.block_rows]).to(dtype)
        self._points = new

    def _index(self, n0: int, n1: int) -> None:
        # Norms of rows n0..n1; the first PIVOTS rows become pivots; pivot distances of the
        # new rows, and of every row to a new pivot.
        p_old, p_new = self._pivots.shape[0], min(PIVOTS, n1)
        if p_new > p_old:
            new = point_values(self._points[p_old:p_new]).to(torch.float64)
            self._pivots = torch.cat([self._pivots, new])
            self._pivot_norm = float(torch.linalg.vector_norm(self._pivots, dim=1).max())
        lo = 0 if p_new > p_old else n0  # a new pivot needs every row's distance to it
        for a in range(lo, n1, self.block_rows):  # each block converted once
            b = min(a + self.block_rows, n1)
            v = point_values(self._points[a:b]).to(torch.float64)
            if b > n0:
                self._norms[max(a, n0):b] = torch.linalg.vector_norm(v[max(a, n0) - a:], dim=1)
            for k in range(p_new):
                if k >= p_old or b > n0:
                    first = a if k >= p_old else max(a, n0)
                    self._pivot_d[first:b, k] = torch.linalg.vector_norm(v[first - a:] - self._pivots[k], dim=1)

    # --- certificates -------------------------------------------------------------

    def answer(self, x: torch.Tensor, template: Certificate) -> Certificate | None:
        """The certificate the memory gives for x without sampling, or None if x lies in no
        committed ball. The deepest containing ball answers (docs/guarantees.md §2), with its
        class, the radius it leaves around x, and its root's sampling; `template` supplies the
        request's other fields."""
        hit = self.lookup(x)
        if hit is None:
            return None
        j, radius = hit
        return answered_from(template, int(self._classes[j]), radius, self.provenance(j), j, self.namespace)

    def check_certificate(self, certificate: Certificate) -> None:
        """Refuse (InvalidParameters) a certificate this memory must not hold: another level
        than its α, or an estimation of fewer than `min_n` votes."""
        if self.alpha is not None and certificate.alpha != self.alpha:
            raise InvalidParameters(f"memory {self.namespace} holds certificates at alpha={self.alpha}, "
                                    f"not {certificate.alpha}: a lax certificate never answers for a strict one")
        if certificate.n < self.min_n:
            raise InvalidParameters(f"memory {self.namespace} takes certificates of at least n={self.min_n} "
                                    f"estimation votes, not {certificate.n}")

    def certify(self, x: torch.Tensor, certificate: Certificate) -> Certificate:
        """Apply the rule to a fresh certificate, commit it, and return the committed one."""
        self.check_certificate(certificate)
        if self.alpha is None:
            self.alpha = certificate.alpha
        before = ABSTAIN if certificate.prediction is None else certificate.prediction
        decision = self.decide(x, before, certificate.radius)
        root = self.provenance(decision.conflict) if decision.outcome == "inside" else Provenance.of(certificate)
        entry = self.commit(x, decision.prediction, decision.radius, root)
        return committed_certificate(certificate, decision.prediction, decision.radius, decision.outcome, entry,
                         decision.conflict, self.provenance(entry), self.namespace)


def answered_from(template: Certificate, prediction: int, radius: float, root: Provenance, entry: int,
                  namespace: str) -> Certificate:
    """A memory answer: entry `entry`'s class and the radius left around the query, reported
    with the root's sampling (no samples spent)."""
    return template.replace(
        prediction=None if prediction == ABSTAIN else prediction, radius=radius, samples=0, **root.fields(),
        memory=MemoryRecord("inside", None, None, None, entry, root=root.root, root_job=root.job,
                            namespace=namespace),
    )


def committed_certificate(fresh: Certificate, prediction: int, radius: float, outcome: str, entry: int,
                          conflict: int | None, root: Provenance, namespace: str) -> Certificate:
    """The certificate of a committed entry: its class and radius, its root's sampling (the
    fresh certificate's own for "new" and "shrunk"; the containing ball's root for "inside"),
    and what this job sampled (class, radius and σ before the rule)."""
    fields = root.fields() if outcome == "inside" else {}
    return fresh.replace(
        prediction=None if prediction == ABSTAIN else prediction, radius=radius, **fields,
        memory=MemoryRecord(outcome, fresh.prediction, fresh.radius, entry, conflict, root=root.root,
                            root_job=root.job, sigma_before=fresh.sigma, namespace=namespace),
    )
