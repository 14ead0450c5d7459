"""The Cohen-style TSV of certificates that `certify-local` and `evaluate` both write.

Columns: `idx label predict radius correct time sigma`, then the bound's columns, the seed,
with adaptive or sequential sampling the estimation size `n` the bounds used, and with the memory its
outcome and the radius before the rule. `predict` is -1 for an abstention; label and correct
are NA when the input has no label. The first six columns are those of Cohen et al.'s
`certify.py`, so their analysis scripts read these files unchanged.

Torch-free: plotting and the API read these files without loading the engine.
"""

from __future__ import annotations

import csv
import os
from typing import TextIO

from smoothcert.results import Certificate

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
    values = [str(idx), _na(label), str(predict), f"{cert.radius:.4f}", _na(correct),
              f"{cert.seconds:.3f}", f"{cert.sigma:.4f}", *_bound_values(cert), str(cert.seed)]
    if sampling != "fixed":
        values.append(str(cert.n))
    if memory:
        record = cert.memory
        values += [_na(record and record.outcome), _na(record and record.radius_before, "{:.4f}")]
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
    if cert.bound == "drs":
        values = cert.p_a_lower_halves or (None, None)
    elif cert.bound == "two_sided":
        values = (cert.p_a_lower, cert.p_b_upper)
    else:
        values = (cert.p_a_lower,)
    return [_na(v, "{:.6f}") for v in values]


def _na(value, fmt: str = "{}") -> str:
    return "NA" if value is None else fmt.format(value)
