"""Task names and queues: the API enqueues by name, the workers register these names.

Only celery is imported here (a client of the broker, not a worker), so the API stays light.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

CERTIFY_TASK = "smoothcert.certify"
PREDICT_TASK = "smoothcert.predict"
EVALUATE_TASK = "smoothcert.evaluate"
QUEUES = {CERTIFY_TASK: "certifications", PREDICT_TASK: "predictions", EVALUATE_TASK: "evaluations"}
TASK_OF_KIND = {"certification": CERTIFY_TASK, "prediction": PREDICT_TASK, "evaluation": EVALUATE_TASK}
# What a worker consumes by default: every queue, in the order they are named here.
ALL_QUEUES = ",".join(dict.fromkeys(QUEUES.values()))


def broker_options(visibility_timeout: int) -> dict:
    """Redis transport options shared by the producer (API) and the consumers (workers)."""
    return {"visibility_timeout": visibility_timeout}


@lru_cache
def producer(broker_url: str, visibility_timeout: int) -> Celery:
    app = Celery("smoothcert-api", broker=broker_url)
    app.conf.broker_transport_options = broker_options(visibility_timeout)
    app.conf.task_ignore_result = True
    return app


def enqueue(broker_url: str, visibility_timeout: int, kind: str, job_id: str) -> None:
    """Send the job's task by name to its queue; the message carries only the job id."""
    task = TASK_OF_KIND[kind]
    producer(broker_url, visibility_timeout).send_task(task, args=[job_id], queue=QUEUES[task])
