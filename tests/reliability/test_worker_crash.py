"""reliability/worker_crash.py at a small size (the full size is `make reliability`)."""

from __future__ import annotations

import pytest

from reliability.worker_crash import parser, run


@pytest.mark.timeout(300)
def test_worker_crash_small():
    report = run(parser().parse_args(["--jobs", "30", "--kills", "4", "--min-commit-kills", "1",
                                      "--in-flight", "8", "--deadline", "200"]))
    assert report.ok, f"{report.text()}\n{report.error}"
