"""reliability/timeouts.py at a small size (the full size is `make reliability`)."""

from __future__ import annotations

import pytest

from reliability.timeouts import parser, run


@pytest.mark.timeout(300)
def test_timeouts_small():
    report = run(parser().parse_args(["--long-jobs", "2", "--wave", "2", "--load", "3", "--deadline", "200"]))
    assert report.ok, f"{report.text()}\n{report.error}"
