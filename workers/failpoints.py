"""Fault-injection points for the reliability scenarios (reliability/worker_crash.py).

Each point is inert unless its testing setting is set; production never sets them.
- `after_commit()`: sleeps SMOOTHCERT_PAUSE_AFTER_COMMIT_SECONDS right after a job's memory
  entry is committed and before its result is written (a window of microseconds otherwise),
  so that a worker can be killed there and the redelivered job must return that entry.
"""

from __future__ import annotations

import time

from service.config import get_settings


def after_commit() -> None:
    seconds = get_settings().pause_after_commit_seconds
    if seconds > 0:
        time.sleep(seconds)
