"""A worker's heartbeat: a daemon thread that records `store.heartbeat(name)` every
`settings.heartbeat_seconds`, so the API's readiness check sees live workers.

At most one thread per process (started again in a forked child, whose threads did not
survive the fork). Nothing stops it but its event: a failed beat (Redis away, or any other
error) is logged once per outage, with the recovery, and the next beat is tried on time, so
the worker shows as live again as soon as Redis is back. After an outage (beats failed, or
Redis restarted: its run id changed), one worker queues again the jobs whose task message
the outage lost (workers/recovery.py), once the grace period has passed; each worker also
makes that pass once after it starts and then every RECOVERY_PERIOD_SECONDS, for a job an
API process stored and died before queueing (its client never retried the submission).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from service.config import Settings
from service.store import Store
from workers.recovery import requeue_lost

log = logging.getLogger(__name__)

# After an outage, wait this long before looking for lost messages, and only consider jobs
# older than this: an API may be between storing a job and queueing it meanwhile.
RECOVERY_GRACE_SECONDS = 30.0
# Between passes when nothing failed: lost jobs are rare, and a pass reads every waiting message.
RECOVERY_PERIOD_SECONDS = 600.0

_lock = threading.Lock()
_running: dict[int, threading.Event] = {}  # pid → stop event


def start_heartbeat(worker: str, settings: Settings, *,
                    recovery_grace: float = RECOVERY_GRACE_SECONDS) -> threading.Event:
    """Start this process's heartbeat (once); returns the event that stops it."""
    with _lock:
        pid = os.getpid()
        if pid in _running:
            return _running[pid]
        stop = _running[pid] = threading.Event()
    # No long retries here (unlike the jobs' store): a beat that cannot be sent is skipped.
    store = Store.from_url(settings.redis_url, prefix=settings.key_prefix)

    def beat() -> None:
        failing, server, recover_at = False, None, time.monotonic() + recovery_grace
        while not stop.is_set():
            try:
                store.heartbeat(worker)
                current = store.server_id()
                if failing or (server is not None and current != server):
                    recover_at = time.monotonic() + recovery_grace
                if failing:
                    log.warning("heartbeat of %s sent again", worker)
                failing, server = False, current
                if time.monotonic() >= recover_at:
                    recover_at = time.monotonic() + RECOVERY_PERIOD_SECONDS
                    if store.claim("requeue-lost", recovery_grace):  # one worker per outage
                        requeue_lost(store, settings, min_age=recovery_grace)
            except Exception as e:  # never let the thread die: readiness would say no worker
                if not failing:
                    log.warning("heartbeat of %s failed (%s: %s); retrying every %g s", worker,
                                type(e).__name__, e, settings.heartbeat_seconds)
                failing = True
            stop.wait(settings.heartbeat_seconds)

    threading.Thread(target=beat, name="smoothcert-heartbeat", daemon=True).start()
    return stop
