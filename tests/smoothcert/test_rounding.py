"""Printed radii and bounds never overstate a certificate (`smoothcert.rounding`, `smoothcert.tsv`).

Each property is also shown to fail for round-to-nearest (and for `floor(x·10^k)/10^k`), so the
tests can tell a safe formatter from an unsafe one.
"""

from __future__ import annotations

import math
import subprocess
import sys
from decimal import Context, Decimal, localcontext

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from smoothcert import tsv
from smoothcert.memory import Memory, invariant_violations
from smoothcert.results import Certificate, MemoryRecord
from smoothcert.rounding import ceil_text, floor_text

PLACES = (3, 4, 6)


def boundaries(places: int) -> list[float]:
    """The floats nearest to j·10^-places in (0, 2], about 20,000 of them (every one for ≤ 4 places)."""
    step = max(1, 10**places // 10**4)
    return [j / 10**places for j in range(1, 2 * 10**places + 1, step)]


def just_below(places: int) -> list[float]:
    """The float just below each boundary: round-to-nearest prints the boundary, above it."""
    return [math.nextafter(b, -math.inf) for b in boundaries(places)] + [0.12345 - 1e-17]


def just_above(places: int) -> list[float]:
    return [math.nextafter(b, math.inf) for b in boundaries(places)]


def nearest(value: float, places: int) -> str:
    return f"{value:.{places}f}"


def naive_floor(value: float, places: int) -> str:
    return repr(math.floor(value * 10**places) / 10**places)


def unsafe_floors(fmt, values, places) -> int:
    return sum(float(fmt(v, places)) > v for v in values)


def unsafe_ceils(fmt, values, places) -> int:
    return sum(float(fmt(v, places)) < v for v in values)


# ---------------------------------------------------------------- the formatter


@given(st.floats(allow_nan=False, allow_infinity=False), st.integers(0, 8))
def test_floor_is_the_exact_decimal_floor(value, places):
    text = floor_text(value, places)
    printed, exact, unit = Decimal(text), Decimal(value), Decimal(1).scaleb(-places)
    with localcontext(Context(prec=400)):  # exact arithmetic on every float's digits
        assert printed <= exact < printed + unit and printed == printed.quantize(unit)
    assert float(text) <= value


@given(st.floats(allow_nan=False, allow_infinity=False), st.integers(0, 8))
def test_ceil_is_the_exact_decimal_ceiling(value, places):
    text = ceil_text(value, places)
    printed, exact, unit = Decimal(text), Decimal(value), Decimal(1).scaleb(-places)
    with localcontext(Context(prec=400)):
        assert printed - unit < exact <= printed and printed == printed.quantize(unit)
    assert float(text) >= value


@given(st.floats(0, 100, allow_nan=False), st.integers(0, 8))
def test_floor_and_ceil_agree_with_nearest_up_to_one_unit(value, places):
    low, high = float(floor_text(value, places)), float(ceil_text(value, places))
    assert low <= value <= high and low <= float(nearest(value, places)) <= high


@pytest.mark.parametrize("places", PLACES)
def test_values_just_below_a_boundary_print_below_it(places):
    values = just_below(places)
    assert unsafe_floors(floor_text, values, places) == 0
    # The same set catches round-to-nearest (every value) and the float-product floor (some).
    assert unsafe_floors(nearest, values, places) >= len(values) - 1
    assert unsafe_floors(naive_floor, values, places) > 0


@pytest.mark.parametrize("places", PLACES)
def test_values_just_above_a_boundary_print_above_it(places):
    values = just_above(places)
    assert unsafe_ceils(ceil_text, values, places) == 0
    assert unsafe_ceils(nearest, values, places) == len(values)


def test_exact_boundaries_and_special_values():
    assert floor_text(0.5, 4) == ceil_text(0.5, 4) == "0.5000"  # binary fractions are exact
    # 0.1235 is stored as 0.12349999999999999866...: below the decimal, so the floor drops a unit.
    assert (floor_text(0.1235, 4), ceil_text(0.1235, 4)) == ("0.1234", "0.1235")
    assert floor_text(1.23, 0) == "1" and ceil_text(1.23, 0) == "2"
    assert floor_text(None, 4) == ceil_text(None, 6) == "NA"
    assert floor_text(math.nan, 4) == "nan" and floor_text(math.inf, 4) == "inf" == ceil_text(math.inf, 6)
    assert floor_text(1e300, 4).startswith("1000000000000000052504760255204420248704468")
    assert floor_text(torch.tensor(0.25, dtype=torch.float32), 4) == "0.2500"  # widened exactly


def test_rounding_and_tsv_do_not_load_torch():
    code = "import sys, smoothcert.rounding, smoothcert.tsv; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- the TSV


def cert(**changes) -> Certificate:
    base = Certificate(prediction=3, radius=0.5, sigma=0.25, bound="cohen", n0=100, n=1000, alpha=0.001,
                       batch_size=100, seed=7, p_a_lower=0.75)
    return base.replace(**changes)


def test_tsv_rounds_radii_and_lower_bounds_down_the_upper_bound_up_and_prints_sigma_exactly():
    r, p_low, p_up, sigma = (math.nextafter(0.1235, 0), math.nextafter(0.9, 0), math.nextafter(0.05, 1),
                             0.1 + 0.2)
    memory = MemoryRecord("shrunk", 3, math.nextafter(0.75, 0), 0, None)
    c = cert(radius=r, sigma=sigma, bound="two_sided", p_a_lower=p_low, p_b_upper=p_up, runner_up=1, memory=memory)
    row = dict(zip(tsv.columns("two_sided", True), tsv.row(0, 3, c, True), strict=True))
    assert (row["radius"], row["pA_lower"], row["pB_upper"], row["radius_before"]) == (
        "0.1234", "0.899999", "0.050001", "0.7499")
    assert row["sigma"] == "0.30000000000000004" and float(row["sigma"]) == sigma
    # What the old round-to-nearest printed: every one of them on the unsafe side.
    assert (nearest(r, 4), nearest(p_low, 6), nearest(p_up, 6)) == ("0.1235", "0.900000", "0.050000")

    drs = cert(bound="drs", p_a_lower=None, p_a_lower_halves=(math.nextafter(0.6, 0), 0.7))
    assert tsv.row(1, None, drs, False)[7:9] == ["0.599999", "0.699999"]  # 0.7 is stored below 0.7
    missing = cert(bound="drs", p_a_lower=None, prediction=None, radius=0.0)
    fields = tsv.row(2, None, missing, True)
    assert fields[1:4] == ["NA", "-1", "0.0000"] and fields[7:9] == ["NA", "NA"] and fields[-2:] == ["NA", "NA"]


# ---------------------------------------------------------------- balls the memory shrank to touch


COUNT, DIM = 300, 8


def touching_certificates() -> tuple[torch.Tensor, list[Certificate], Memory]:
    """COUNT certificates on a line, classes alternating along it, committed in a random order
    through the memory rule. Neighbours are 1 to 1.2 apart and every candidate radius is in
    [0.7, 0.99): no point lies in a committed ball, and each candidate overlaps its committed
    neighbours, so the rule shrinks it to touch the nearest one (up to its 1e-9 margin)."""
    gen = torch.Generator().manual_seed(20240611)
    direction = torch.randn(DIM, generator=gen, dtype=torch.float64)
    direction /= torch.linalg.vector_norm(direction)
    along = torch.cumsum(1 + 0.2 * torch.rand(COUNT, generator=gen, dtype=torch.float64), 0)
    points = along[:, None] * direction
    memory = Memory("test/fp32", DIM, dtype=torch.float64)
    certs = [None] * COUNT
    for i in torch.randperm(COUNT, generator=gen).tolist():
        radius = 0.7 + 0.29 * float(torch.rand((), generator=gen, dtype=torch.float64))
        fresh = cert(prediction=i % 2, radius=radius, seed=i, p_a_lower=float(torch.rand((), generator=gen)))
        certs[i] = memory.certify(points[i], fresh)
    return points, certs, memory


def printed_violations(tmp_path, points, certs) -> int:
    """Pairs of different-class balls that intersect with the radii as the TSV prints them."""
    path = tmp_path / "results.tsv"
    with open(path, "w", newline="") as f:
        writer = tsv.Writer(f, "cohen", memory=True)
        for i, c in enumerate(certs):
            writer.write(i, i % 2, c)
    rows = tsv.read(path)
    assert [int(r["idx"]) for r in rows] == list(range(COUNT))
    radii = torch.tensor([float(r["radius"]) for r in rows], dtype=torch.float64)
    classes = torch.tensor([int(r["predict"]) for r in rows])
    return invariant_violations(points, classes, radii)


def test_balls_shrunk_to_touch_stay_apart_in_the_tsv(tmp_path, monkeypatch):
    points, certs, memory = touching_certificates()
    outcomes = [c.memory.outcome for c in certs]
    assert set(outcomes) == {"new", "shrunk"} and outcomes.count("shrunk") >= COUNT // 2
    assert [c.prediction for c in certs] == [i % 2 for i in range(COUNT)]
    assert invariant_violations(memory.points, memory.classes, memory.radii) == 0
    radii = torch.tensor([c.radius for c in certs], dtype=torch.float64)
    gaps = torch.linalg.vector_norm(points[1:] - points[:-1], dim=1) - (radii[1:] + radii[:-1])
    assert int((gaps < 1e-8).sum()) >= COUNT // 2  # most neighbours touch, up to the rule's margin

    assert printed_violations(tmp_path, points, certs) == 0
    # The check has power: printed to nearest, touching balls intersect.
    monkeypatch.setattr(tsv, "floor_text", lambda value, places: nearest(value, places))
    assert printed_violations(tmp_path, points, certs) > 10
