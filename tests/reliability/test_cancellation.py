"""reliability/cancellation.py at a small size (the full size is `make reliability`)."""

from __future__ import annotations

import pytest

from reliability.cancellation import parser, run


@pytest.mark.timeout(300)
def test_cancellation_small():
    report = run(parser().parse_args(["--cancels", "4", "--concurrent", "2", "--load", "2",
                                      "--max-batches", "3", "--deadline", "200"]))
    assert report.ok, f"{report.text()}\n{report.error}"
