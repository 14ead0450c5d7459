"""reliability/soundness.py at a small size (the full size: `python reliability/soundness.py`)."""

from __future__ import annotations

import pytest

from reliability.soundness import parser, run


@pytest.mark.timeout(300)
def test_soundness_small():
    # 100 certifications per cell (six cells): enough for the plug-in variant to be flagged (its rate is
    # ~0.45 against α = 0.1), so the check that the test can fail runs here too.
    report = run(parser().parse_args(["--jobs", "600", "--clients", "8", "--deadline", "240"]))
    assert report.ok, f"{report.text()}\n{report.error}"
