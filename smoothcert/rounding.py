"""Decimal text of a float rounded in the safe direction, exactly. Torch-free.

A printed radius is a promise: it must never exceed the certified value. `floor_text` (for
radii and lower confidence bounds) prints a number ≤ the value and `ceil_text` (for upper
bounds) one ≥ it, at `places` decimals. Both round the float's exact binary value
(`Decimal(value)`), never a product such as `value * 10**places`, which can itself round up
across an integer. The float nearest to the printed text is also on the safe side of the
value, because rounding to the nearest float is monotone and the value is a float already.
"""

from __future__ import annotations

import math
from decimal import ROUND_CEILING, ROUND_FLOOR, Context, Decimal

# Enough digits for any finite float's integer part (≤ 309 digits) plus the decimals kept,
# so quantize never runs out of precision.
_DIGITS = 330


def floor_text(value: float | None, places: int) -> str:
    """`value` rounded toward −∞ at `places` decimals: a decimal number ≤ value, exactly."""
    return _rounded(value, places, ROUND_FLOOR)


def ceil_text(value: float | None, places: int) -> str:
    """`value` rounded toward +∞ at `places` decimals: a decimal number ≥ value, exactly."""
    return _rounded(value, places, ROUND_CEILING)


def _rounded(value: float | None, places: int, rounding: str) -> str:
    # None is "NA" and NaN/±inf print as f"{value:.{places}f}" does, as the TSV always wrote them.
    if value is None:
        return "NA"
    value = float(value)  # numpy and 0-d tensors widen exactly
    if not math.isfinite(value):
        return f"{value:.{places}f}"
    quantum = Decimal(1).scaleb(-places)
    exact = Decimal(value).quantize(quantum, rounding=rounding, context=Context(prec=_DIGITS + places))
    return f"{exact:f}"
