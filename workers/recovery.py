"""Jobs whose task message was lost in a Redis outage, queued again.

The Redis transport hands a message out by popping it from its queue (BRPOP) and then
records it as unacknowledged in a second step; if Redis stops between the two (or the
pop's answer never reaches the worker), the pop is kept (append-only file) and the message
is gone, while its job stays "queued" forever. Likewise an API that stored a job and then
could neither queue it nor fail it (Redis went away in between) leaves it queued with no
message. `requeue_lost` finds such jobs (queued, older than a grace period, named by no
message waiting in a queue nor held unacknowledged) and sends their task again. A job sent
twice (a message in flight during the check) runs at most once more and ends once (the
store's compare-and-set): harmless. The heartbeat thread runs it once after each outage.
"""

from __future__ import annotations

import logging
import time

from service import queue
from service.config import Settings
from service.queue import QUEUES
from service.store import Store

log = logging.getLogger(__name__)


def requeue_lost(store: Store, settings: Settings, *, min_age: float) -> list[str]:
    """Send again the task of every job queued for more than `min_age` seconds that no broker
    message names; returns their ids."""
    candidates = store.queued_jobs(time.time() - min_age)
    if not candidates:
        return []
    held = store.broker_messages(sorted(set(QUEUES.values())))
    lost = [(job_id, kind) for job_id, kind in candidates if job_id.encode() not in held
            and (job := store.get_job(job_id)) is not None and job.status == "queued"]  # still, after the read
    for job_id, kind in lost:
        log.warning("job %s was queued with no task message (lost in a Redis outage); queueing it again", job_id)
        queue.enqueue(settings.redis_url, settings.visibility_timeout, kind, job_id)
        store.mark_enqueued(job_id)
    return [job_id for job_id, _ in lost]
