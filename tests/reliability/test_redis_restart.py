"""reliability/redis_restart.py at a small size (the full size is `make reliability`): one
SIGTERM restart, and one SIGKILL restart (appendfsync always), each during load."""

from __future__ import annotations

import pytest

from reliability.redis_restart import parser, run

SMALL = ["--jobs", "24", "--restarts", "1", "--down-seconds", "3", "--clients", "4", "--workers", "1",
         "--api-workers", "1", "--deadline", "200"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stop", ["term", "kill"])
def test_redis_restart_small(stop):
    report = run(parser().parse_args([*SMALL, "--stop", stop]))
    assert report.ok, f"{report.text()}\n{report.error}"
