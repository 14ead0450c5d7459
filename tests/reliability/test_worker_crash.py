"""reliability/worker_crash.py at a small size (the full size is `make reliability`)."""

from __future__ import annotations

import pytest

from reliability.worker_crash import parser, run


# The deadline bounds liveness, not speed: a job killed several times waits out the visibility
# timeout each time, and on 2 shared cores one CI run in three drained in 180-200 s.
@pytest.mark.timeout(380)
def test_worker_crash_small():
    report = run(parser().parse_args(["--jobs", "30", "--kills", "4", "--min-commit-kills", "1",
                                      "--in-flight", "8", "--deadline", "280"]))
    assert report.ok, f"{report.text()}\n{report.error}"
