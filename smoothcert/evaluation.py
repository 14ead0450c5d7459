"""Certified accuracy of a bundle on a data split (docs/algorithms.md §9), and the run directory.

`evaluate` certifies every k-th example of a split in index order, each with the seed
`derive_seed(seed, idx)` of its dataset index (so runs with different `every` or `limit`
give the same certificate for a shared example when no memory is used). With a memory the
rule of ALGORITHMS §3.1 is applied in that order, so its answers depend on it; every
certificate it issued is consistent with the others. Same arguments, same device → same
certificates (but for `seconds`).

Definitions (§9): certified accuracy at r = fraction of rows that are correct (not
abstained, prediction = label) AND have radius ≥ r; ACR = mean over all rows of the radius,
counting 0 for wrong or abstained rows; clean accuracy = certified accuracy at r = 0.

A run directory holds `results.tsv` (`smoothcert.tsv`: the columns of certify-local, idx
being the dataset index, radii rounded down), `summary.json` (exact floats) and `curve.png`.
Progress notes print each radius rounded down too, never up. `summary.json` (schema
"smoothcert.evaluation/1"; fractions in [0, 1], radii in ℓ2 pixel units, times in seconds):

    schema            "smoothcert.evaluation/1"
    parameters        {model: {name, digest, kind, numeric_mode},
                       data: {source, split, size},
                       method: "fixed" | "ddrs" | "insta" | "selector",
                       sigma: float | null            (fixed σ; null with a search),
                       sigma_search: {method, steps, lr, samples, init} | null,
                       bound, n0, n, alpha, batch_size, seed, memory: bool,
                       every, limit: int | null, device,
                       sampling: "fixed" | "adaptive" | "sequential", tolerance: float | null,
                       target_radius: float | null (adaptive and sequential: n is the
                       maximum; smoothcert.adaptive, smoothcert.sequential)}
    count             rows certified
    clean_accuracy    = certified accuracy at r = 0
    abstention_rate   fraction of rows abstained
    acr               average certified radius
    certified_accuracy [{radius, accuracy, count}], radii ascending; count = rows correct
                      with radius ≥ radius, accuracy = count / count of rows
    sigma             {mean, min, max} of the σ each certificate used
    seconds           {mean, total} of the per-certificate time
    samples           {mean, search_mean: float | null, certification_mean, estimation_mean}:
                      forward passes per row; search (null when no search ran) +
                      selection/estimation (n0 + n; 0 for a row answered from the memory);
                      estimation_mean: the n the bounds used (adaptive: chosen per row, ≤ n;
                      sequential: the votes of the look the radius came from)
    memory            null without a memory, else {entries, new, inside, shrunk, changed}:
                      entries committed; outcomes per row; changed = inside + shrunk

Torch-free at import: the service can read and check summaries without loading the engine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from smoothcert import tsv
from smoothcert.adaptive import check_sampling
from smoothcert.bounds import InvalidParameters
from smoothcert.results import Certificate
from smoothcert.rounding import floor_text
from smoothcert.search import SigmaSearch
from smoothcert.sequential import check_target

if TYPE_CHECKING:
    from smoothcert.certifier import Certifier
    from smoothcert.data import Dataset

SCHEMA = "smoothcert.evaluation/1"
GRID_STEP = 0.25
GRID_MIN_TOP = 1.0  # the default grid always reaches r = 1.0 (Cohen's tables do)
GRID_MAX_TOP = 10.0  # keeps the default grid ≤ 41 points; larger radii still count in ACR


class Progress(Protocol):
    """What evaluate reports to (`smoothcert.progress.ProgressBar` is one)."""

    def stage(self, stage: str, done: int, total: int) -> None: ...

    def advance(self, note: str = "") -> None: ...


@dataclass(frozen=True)
class EvaluationRow:
    """One certified example: its index in the split, its label and its certificate."""

    idx: int
    label: int
    certificate: Certificate

    @property
    def correct(self) -> bool:
        """Not abstained and the certified class is the label."""
        return self.certificate.prediction is not None and self.certificate.prediction == self.label

    @property
    def certified_radius(self) -> float:
        """The radius if correct, else 0: the quantity ACR averages."""
        return self.certificate.radius if self.correct else 0.0


@dataclass(frozen=True)
class EvaluationRun:
    """The rows of an evaluation in certification order, and every parameter that made them."""

    rows: tuple[EvaluationRow, ...]
    parameters: dict[str, Any]

    def summary(self, radii: Sequence[float] | None = None) -> dict[str, Any]:
        return summarize(self.rows, radii, parameters=self.parameters)


def evaluate(
    certifier: Certifier,
    dataset: Dataset,
    *,
    every: int = 1,
    limit: int | None = None,
    start: int = 0,
    sigma: float | None = None,
    sigma_search: SigmaSearch | None = None,
    bound: str | None = None,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    sampling: str = "fixed",
    tolerance: float | None = None,
    target_radius: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    memory: bool = False,
    progress: Progress | None = None,
    on_row: Callable[[EvaluationRow], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> EvaluationRun:
    """Certify examples start, start + every, start + 2·every, ... (at most `limit`) of
    `dataset` in that order (`start` picks a disjoint subset, for example to choose settings on
    images apart from the evaluated ones).

    `memory` applies the memory rule across the run (one fresh memory for this run).
    `on_row` sees each row as soon as it is certified (to stream results); `cancel` is
    checked between batches (the engine raises Cancelled). Refused parameters raise
    InvalidParameters before or at the first example.
    """
    # Imported here: sampling loads torch, and this module stays importable without it.
    from smoothcert.sampling import derive_seed

    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise InvalidParameters(f"every must be an integer ≥ 1, got {every!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidParameters(f"limit must be an integer ≥ 1, got {limit!r}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise InvalidParameters(f"start must be an integer ≥ 0, got {start!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidParameters(f"seed must be an integer (evaluations are always seeded), got {seed!r}")
    indices = range(start, len(dataset), every)[:limit]
    if not indices:
        raise InvalidParameters(f"{dataset.source} ({dataset.split}) has no examples to evaluate")
    spec = certifier.spec
    search = sigma_search.resolved() if sigma_search is not None else None
    bound = bound or ("drs" if spec.kind == "drs" else "cohen")
    tolerance = check_sampling(sampling, tolerance)
    target_radius = check_target(sampling, target_radius)
    table = certifier.new_memory(alpha) if memory else None
    if batch_size is None:  # resolved once, so every row and the summary name the same size
        batch_size = certifier.batch.rows

    rows = []
    for idx in indices:
        cert = certifier.certify(
            dataset.x[idx], sigma=sigma, sigma_search=search, bound=bound, n0=n0, n=n, alpha=alpha,
            sampling=sampling, tolerance=tolerance, target_radius=target_radius,
            batch_size=batch_size, seed=derive_seed(seed, idx), memory=table,
            progress=progress.stage if progress is not None else None, cancel=cancel,
        )
        row = EvaluationRow(idx, int(dataset.y[idx]), cert)
        rows.append(row)
        if on_row is not None:
            on_row(row)
        if progress is not None:
            predict = "abstain" if cert.abstained else cert.prediction
            progress.advance(f"#{idx}: label {row.label} predict {predict} radius {floor_text(cert.radius, 3)}")

    parameters = {
        "model": {"name": spec.name, "digest": certifier.bundle.digest, "kind": spec.kind,
                  "numeric_mode": certifier.numeric_mode},
        "data": {"source": dataset.source, "split": dataset.split, "size": len(dataset)},
        "method": search.method if search is not None else "selector" if spec.kind == "selector" else "fixed",
        "sigma": (None if search is not None or spec.kind == "selector"  # a selector chooses σ per input
                  else float(spec.sigma.default if sigma is None else sigma)),
        "sigma_search": dataclasses.asdict(search) if search is not None else None,
        "bound": bound, "n0": n0, "n": n, "alpha": alpha, "batch_size": batch_size, "seed": seed,
        "memory": memory, "every": every, "limit": limit, "start": start, "device": str(certifier.device),
        "sampling": sampling, "tolerance": tolerance, "target_radius": target_radius,
    }
    return EvaluationRun(tuple(rows), parameters)


def radius_grid(rows: Sequence[EvaluationRow], step: float = GRID_STEP) -> list[float]:
    """0, step, 2·step, ... up to the largest certified radius rounded up to a step, at
    least GRID_MIN_TOP and at most GRID_MAX_TOP."""
    largest = max((row.certified_radius for row in rows), default=0.0)
    top = min(GRID_MAX_TOP, max(GRID_MIN_TOP, math.ceil(largest / step - 1e-9) * step))
    # Multiples of 0.25 are exact binary fractions, so the grid prints as 0.25, 0.5, ...
    return [k * step for k in range(int(round(top / step)) + 1)]


def certified_accuracy(rows: Sequence[EvaluationRow], radius: float) -> float:
    """Fraction of rows that are correct and certified at radius ≥ `radius` (§9)."""
    return sum(row.correct and row.certificate.radius >= radius for row in rows) / len(rows)


def summarize(
    rows: Sequence[EvaluationRow], radii: Sequence[float] | None = None, *,
    parameters: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The metrics of `rows` as summary.json holds them (schema in the module docstring).

    `radii` defaults to `radius_grid(rows)`; `parameters` (an EvaluationRun's) are copied in.
    """
    if not rows:
        raise ValueError("summarize needs at least one row")
    if radii is None:
        radii = radius_grid(rows)
    radii = sorted({float(r) for r in radii})
    if any(not math.isfinite(r) or r < 0 for r in radii):
        raise ValueError(f"radii must be finite and ≥ 0, got {radii}")
    count = len(rows)
    certs = [row.certificate for row in rows]
    search = [c.search.samples_used if c.search is not None else 0 for c in certs]
    outcomes = Counter(c.memory.outcome for c in certs if c.memory is not None)
    memory = None
    if outcomes:
        memory = {"entries": sum(c.memory is not None and c.memory.entry is not None for c in certs),
                  **{k: outcomes[k] for k in ("new", "inside", "shrunk")},
                  "changed": count_changed(rows)}
    sigmas = [c.sigma for c in certs]
    return {
        "schema": SCHEMA,
        "parameters": dict(parameters or {}),
        "count": count,
        "clean_accuracy": sum(row.correct for row in rows) / count,
        "abstention_rate": sum(c.abstained for c in certs) / count,
        "acr": sum(row.certified_radius for row in rows) / count,
        "certified_accuracy": [
            {"radius": r, "accuracy": certified_accuracy(rows, r),
             "count": sum(row.correct and row.certificate.radius >= r for row in rows)}
            for r in radii
        ],
        "sigma": {"mean": sum(sigmas) / count, "min": min(sigmas), "max": max(sigmas)},
        "seconds": {"mean": sum(c.seconds for c in certs) / count, "total": sum(c.seconds for c in certs)},
        "samples": {
            "mean": sum(c.samples for c in certs) / count,
            "search_mean": sum(search) / count if any(c.search is not None for c in certs) else None,
            "certification_mean": sum(c.samples - s for c, s in zip(certs, search, strict=True)) / count,
            "estimation_mean": sum(c.n if c.samples else 0 for c in certs) / count,
        },
        "memory": memory,
    }


def count_changed(rows: Sequence[EvaluationRow]) -> int:
    """Certificates the memory rule changed (outcome inside or shrunk)."""
    return sum(row.certificate.memory is not None and row.certificate.memory.outcome != "new" for row in rows)


def write_run(run_dir: str | os.PathLike, run: EvaluationRun, radii: Sequence[float] | None = None) -> dict[str, Any]:
    """Write results.tsv, summary.json and curve.png into `run_dir` (created if needed);
    returns the summary."""
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = run.parameters
    with open(out / "results.tsv", "w", newline="") as f:
        writer = tsv.Writer(f, params["bound"], params["memory"], params.get("sampling", "fixed"))
        for row in run.rows:
            writer.write(row.idx, row.label, row.certificate)
    summary = run.summary(radii)
    # allow_nan=False: the file is served as JSON, where NaN is not a value.
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    from smoothcert.plotting import plot_runs  # matplotlib only when a plot is drawn

    plot_runs([out], out / "curve.png")
    return summary
