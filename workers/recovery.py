"""Jobs whose task message was lost in a Redis outage, queued again.

The Redis transport hands a message out by popping it from its queue (BRPOP) and then
records it as unacknowledged in a second step; if Redis stops between the two (or the
pop's answer never reaches the worker), the pop is kept (append-only file) and the message
is gone, while its job stays "queued" forever. Likewise an API that stored a job and then
could neither queue it nor fail it (Redis went away in between) leaves it queued with no
message. `requeue_lost` finds such jobs (queued, older than a grace period, named by no
message waiting in any device's queue nor held unacknowledged) and sends their task again,
to the queue recorded with the job at submit (chosen from its numeric mode and the API's
SMOOTHCERT_QUEUE_DEVICES, which a worker's own settings need not repeat), or to its kind's
CPU queue for a job stored before queues had devices. A job sent twice (a message in flight
during the check) runs at most once more and ends once (the store's compare-and-set):
harmless. The heartbeat thread runs it once after each outage.
"""

from __future__ import annotations

import logging
import time

from service import queue
from service.config import Settings
from service.queue import QUEUE_DEVICE
from service.store import Store

log = logging.getLogger(__name__)


def requeue_lost(store: Store, settings: Settings, *, min_age: float) -> list[str]:
    """Send again the task of every job queued for more than `min_age` seconds that no broker
    message names; returns their ids."""
    candidates = store.queued_jobs(time.time() - min_age)
    if not candidates:
        return []
    held = store.broker_messages(sorted(QUEUE_DEVICE))  # every device's queues
    lost = [job for job_id, _ in candidates if job_id.encode() not in held
            and (job := store.get_job(job_id)) is not None and job.status == "queued"]  # still, after the read
    for job in lost:
        log.warning("job %s was queued with no task message (lost in a Redis outage); queueing it again "
                    "on %s", job.id, job.queue or "its CPU queue")
        queue.enqueue(settings.redis_url, settings.visibility_timeout, job.kind, job.id, job.queue)
        store.mark_enqueued(job.id)
    return [job.id for job in lost]
