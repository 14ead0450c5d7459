"""Fault, load and soundness scenarios against the real stack (RELIABILITY.md).

One module per scenario; each runs `python reliability/<name>.py`, ends by itself within
its bounds, prints PASS/FAIL lines and writes its figures with `--json`. `make reliability`
runs them all at full size; `tests/reliability/` runs each at a small size.
"""
