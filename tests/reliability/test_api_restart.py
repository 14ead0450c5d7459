"""The API-restart scenario at a small size (reliability/api_restart.py has the full one)."""

from __future__ import annotations

import pytest

from reliability.api_restart import parser, run


@pytest.mark.timeout(300)
def test_clients_ride_out_api_restarts(tmp_path):
    args = parser().parse_args(["--jobs", "30", "--clients", "3", "--async-clients", "2", "--restarts", "2",
                                "--n", "500", "--sample", "3", "--deadline", "240", "--logs", str(tmp_path)])
    report = run(args)
    assert report.ok, f"{report.text()}\n{report.error or ''}\n{report.figures}"
