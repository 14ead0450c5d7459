"""A worker's heartbeat: a daemon thread that records `store.heartbeat(name)` every
`settings.heartbeat_seconds`, so the API's readiness check sees live workers.

At most one thread per process (started again in a forked child, whose threads did not
survive the fork); a Redis outage is logged and retried, never fatal to the worker.
"""

from __future__ import annotations

import logging
import os
import threading

import redis

from service.config import Settings
from service.store import Store

log = logging.getLogger(__name__)

_lock = threading.Lock()
_running: dict[int, threading.Event] = {}  # pid → stop event


def start_heartbeat(worker: str, settings: Settings) -> threading.Event:
    """Start this process's heartbeat (once); returns the event that stops it."""
    with _lock:
        pid = os.getpid()
        if pid in _running:
            return _running[pid]
        stop = _running[pid] = threading.Event()
    store = Store.from_url(settings.redis_url, prefix=settings.key_prefix)

    def beat() -> None:
        while not stop.is_set():
            try:
                store.heartbeat(worker)
            except redis.RedisError as e:
                log.warning("heartbeat of %s failed: %s", worker, e)
            stop.wait(settings.heartbeat_seconds)

    threading.Thread(target=beat, name="smoothcert-heartbeat", daemon=True).start()
    return stop
