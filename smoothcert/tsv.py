"""The Cohen-style TSV of certificates that `certify-local` and `evaluate` both write.

Columns: `idx label predict radius correct time sigma`, then the bound's columns, the seed,
with adaptive or sequential sampling the estimation size `n` the bounds used, and with the memory its
outcome and the radius before the rule. `predict` is -1 for an abstention; label and correct
are NA when the input has no label. The first six columns are those of Cohen et al.'s
`certify.py`, so their analysis scripts read these files unchanged.

Rounding never overstates a certificate (`smoothcert.rounding`, exact decimal rounding):
`radius` and `radius_before` are rounded down at 4 decimals, the lower bounds (`pA_lower`,
`pA_lower_left`, `pA_lower_right`) down and `pB_upper` up at 6 decimals. So the printed
number, and the float nearest to it, is never larger than the certified radius, and balls
the memory shrank to touch never intersect in the file. `sigma` is printed exactly (the
shortest text that reads back as the same float), so an auditor can re-derive the radius.

Torch-free: plotting and the API read these files without loading the engine.
"""

from __future__ import annotations

import csv
import os
from typing import TextIO

from smoothcert.results import Certificate
from smoothcert.rounding import ceil_text, floor_text

BOUND_COLUMNS = {
    "cohen": ("pA_lower",),
    "two_sided": ("pA_lower", "pB_upper"),
    "drs": ("pA_lower_left", "pA_lower_right"),
}
MEMORY_COLUMNS = ("memory", "radius_before")


def columns(bound: str, memory: bool, sampling: str = "fixed") -> list[str]:
    """The header for certificates of `bound`, with `n` unless sampling is fixed, and the
    memory's columns when it is used."""
    cols = ["idx", "label", "predict", "radius", "correct", "time", "sigma", *BOUND_COLUMNS[bound], "seed"]
    cols += ["n"] if sampling != "fixed" else []
    return cols + list(MEMORY_COLUMNS) if memory else cols


def row(idx: int, label: int | None, cert: Certificate, memory: bool, sampling: str = "fixed") -> list[str]:
    """One certificate as the fields of `columns(cert.bound, memory, sampling)`."""
    predict = -1 if cert.abstained else cert.prediction
    correct = None if label is None else int(predict == label)
    values = [str(idx), _na(label), str(predict), floor_text(cert.radius, 4), _na(correct),
              f"{cert.seconds:.3f}", repr(float(cert.sigma)), *_bound_values(cert), str(cert.seed)]
    if sampling != "fixed":
        values.append(str(cert.n))
    if memory:
        record = cert.memory
        values += [_na(record and record.outcome), floor_text(record and record.radius_before, 4)]
    return values


class Writer:
    """Writes the header at once, then one flushed line per certificate, so a long run can be
    followed (and a killed run keeps its finished rows)."""

    def __init__(self, out: TextIO, bound: str, memory: bool, sampling: str = "fixed"):
        self.out, self.memory, self.sampling = out, memory, sampling
        self._line(columns(bound, memory, sampling))

    def write(self, idx: int, label: int | None, cert: Certificate) -> None:
        self._line(row(idx, label, cert, self.memory, self.sampling))

    def _line(self, fields: list[str]) -> None:
        print("\t".join(fields), file=self.out, flush=True)


def read(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a results TSV as dicts of strings, keyed by column."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _bound_values(cert: Certificate) -> list[str]:
    # Lower bounds round down, the upper bound up: a printed bound is never tighter than the certified one.
    if cert.bound == "drs":
        left, right = cert.p_a_lower_halves or (None, None)
        return [floor_text(left, 6), floor_text(right, 6)]
    if cert.bound == "two_sided":
        return [floor_text(cert.p_a_lower, 6), ceil_text(cert.p_b_upper, 6)]
    return [floor_text(cert.p_a_lower, 6)]


def _na(value) -> str:
    return "NA" if value is None else str(value)
