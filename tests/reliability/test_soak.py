"""reliability/soak.py at a small size (the full size: `python reliability/soak.py`)."""

from __future__ import annotations

import pytest

from reliability.soak import parser, run


@pytest.mark.timeout(300)
def test_soak_small():
    # 300 jobs are too few to tell a slow leak from warm-up (models load on first use), so
    # the growth bound here is 1,000 MiB per 1,000 jobs: it still fails a leak of 1 MiB a job.
    report = run(parser().parse_args(["--jobs", "300", "--clients", "8", "--sample-seconds", "0.5",
                                      "--max-growth-mib", "1000", "--deadline", "240"]))
    assert report.ok, f"{report.text()}\n{report.error}"
