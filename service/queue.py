"""Task names and queues: the API enqueues by name, the workers register these names.

Only celery is imported here (a client of the broker, not a worker), so the API stays light.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from functools import cached_property, lru_cache

from celery import Celery
from kombu.transport import redis as kombu_redis

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


class _PublishingChannel(kombu_redis.Channel):
    """kombu's Redis channel, keeping one client: kombu builds a new `redis.Redis` (with its
    ~170 response callbacks) for every message it publishes, most of what a publish costs.
    The client is thread-safe and draws on the channel's own connection pool, as before."""

    @cached_property
    def _publishing_client(self):
        return self._create_client()

    @contextmanager
    def conn_or_acquire(self, client=None):
        yield client or self._publishing_client


class PublishingTransport(kombu_redis.Transport):
    """kombu's Redis transport with `_PublishingChannel`: for the API, which only publishes."""

    Channel = _PublishingChannel


@lru_cache
def producer(broker_url: str, visibility_timeout: int) -> Celery:
    app = Celery("smoothcert-api", broker=broker_url)
    if broker_url.startswith(("redis://", "rediss://", "unix://")):
        app.conf.broker_transport = PublishingTransport
    app.conf.broker_transport_options = broker_options(visibility_timeout)
    app.conf.task_ignore_result = True
    return app


@lru_cache
def _publish_options(broker_url: str, visibility_timeout: int) -> dict:
    """`producer`'s publishing settings, read once: every read of a Celery setting costs
    about 4 µs, and these never change once the app is made."""
    conf = producer(broker_url, visibility_timeout).conf
    return {"delivery_mode": conf.task_default_delivery_mode, "retry": True,
            "retry_policy": conf.task_publish_retry_policy}


def enqueue(broker_url: str, visibility_timeout: int, kind: str, job_id: str) -> None:
    """Send the job's task by name to its queue; the message carries only the job id.

    What `send_task(task, args=[job_id], queue=...)` sends (Celery's task message, protocol 2,
    to the queue through the default exchange, with the same retry policy; results ignored),
    for 40% of its CPU: no routing, queue declaration, result bookkeeping or signals, which
    such a message does not need. Every submission pays this (benchmarks/api.py).
    """
    task = TASK_OF_KIND[kind]
    app = producer(broker_url, visibility_timeout)
    message = app.amqp.as_task_v2(str(uuid.uuid4()), task, args=[job_id], kwargs={}, ignore_result=True,
                                  argsrepr=repr([job_id]), kwargsrepr="{}")
    with app.producer_or_acquire() as publisher:
        publisher.publish(message.body, exchange="", routing_key=QUEUES[task], headers=message.headers,
                          serializer="json", declare=[], **_publish_options(broker_url, visibility_timeout),
                          **message.properties)
