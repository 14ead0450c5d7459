"""The workers' Celery app: `celery -A workers.celery_app worker -Q certifications,predictions,evaluations`
on a CPU, `-Q certifications-cuda,predictions-cuda,evaluations-cuda` on a GPU (service/queue.py).

Queues: a worker consumes its device's queues. One that is told to consume a CUDA queue
and cannot run CUDA (SMOOTHCERT_DEVICE names another device, or no CUDA device is visible)
refuses to start, rather than take jobs that need CUDA and fail them one by one.

Delivery policy: a task is acknowledged only after it ran (`acks_late`), and requeued when
its worker process dies (`reject_on_worker_lost`); a whole worker that dies leaves the
message unacknowledged, and the broker hands it out again after the visibility timeout.
A job therefore may run twice but ends once (the store's compare-and-set), and commits at
most one memory entry. Prefetch 1: a long job never holds other jobs hostage.

Broker outages (a Redis restart): the consumer reconnects by itself, for as long as it
takes; running jobs are not cancelled (their store calls retry through the outage, see
workers/tasks.py) and acknowledge their messages once they end.
"""

from __future__ import annotations

import logging

import redis
from celery import Celery, signals
from kombu.transport import redis as kombu_redis

from service.config import get_settings
from service.durability import MemoryUnavailable, durability_problems
from service.queue import QUEUES, broker_options, cuda_visible, device_type, queues_beyond, worker_queues
from workers.heartbeat import start_heartbeat

log = logging.getLogger(__name__)


class _Channel(kombu_redis.Channel):
    """kombu's Redis channel, able to reach the broker after kombu has detached its transport.

    When the consumer loses the broker, kombu may close the transport (its `client`, the
    broker's address, set to None) before one of its channels, whose closing (restoring
    unacknowledged messages) and the late acks of jobs still running then build a new pool
    from that address: AttributeError, which no one catches, and the worker stops
    ("Unrecoverable error") instead of reconnecting. The channel keeps the address it was
    opened with and gives it back to a detached transport: those calls then reach the broker
    (or fail with a connection error that kombu handles)."""

    def __init__(self, connection, *args, **kwargs):
        self._broker = connection.client
        super().__init__(connection, *args, **kwargs)

    def _connparams(self, asynchronous=False):
        if self.connection.client is None:  # detached: this transport is no longer used otherwise
            self.connection.client = self._broker
        return super()._connparams(asynchronous=asynchronous)


def sweep_lock_seconds(visibility_timeout: int) -> int:
    """How long the redelivery sweep's lock lives: at most half the visibility timeout."""
    return max(1, min(60, visibility_timeout // 2))


class WorkerTransport(kombu_redis.Transport):
    Channel = _Channel


settings = get_settings()

app = Celery("smoothcert", broker=settings.redis_url, include=["workers.tasks"])
if settings.redis_url.startswith(("redis://", "unix://")):  # rediss: kombu's own, which sets up TLS by name
    app.conf.broker_transport = WorkerTransport
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    broker_transport_options={
        **broker_options(settings.visibility_timeout),
        # Consumer side only: sweep for messages of dead workers every few seconds (kombu's
        # default sweep runs about every 100 s, far longer than a short visibility timeout).
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 5)),
        "unacked_restore_throttle": 1,
        # The sweep's lock outlives a worker killed while sweeping: kombu's default (300 s)
        # then stops every redelivery for five minutes. A sweep takes milliseconds, and two
        # sweeps at once are harmless (each restore is a WATCHed transaction), so the lock
        # expires well within the visibility timeout.
        "unacked_mutex_expire": sweep_lock_seconds(settings.visibility_timeout),
    },
    broker_connection_retry_on_startup=True,
    broker_connection_retry=True,
    broker_connection_max_retries=None,  # a worker never gives up on the broker
    worker_cancel_long_running_tasks_on_connection_loss=False,
    task_soft_time_limit=settings.job_time_limit_seconds,
    task_time_limit=settings.job_time_limit_seconds + 60,
    task_routes={name: {"queue": queue} for name, queue in QUEUES.items()},
)


@signals.worker_init.connect
def _consume_only_what_this_device_runs(sender=None, **_) -> None:
    # After -Q is applied and before any message is taken. Celery logs and ignores an exception
    # from a signal handler; SystemExit is not one, so the worker exits with this message.
    consumed = list(sender.app.amqp.queues.consume_from or {})  # empty without -Q
    cuda_queues = queues_beyond("cpu", consumed)  # what only a CUDA worker may take
    if not cuda_queues:
        return
    configured = device_type(settings.device) if settings.device else None
    why = (f"SMOOTHCERT_DEVICE={settings.device}" if configured and configured != "cuda"
           else None if cuda_visible() else "no CUDA device is visible to torch")
    if why:
        raise SystemExit(f"smoothcert worker: refusing to consume {', '.join(cuda_queues)}: their jobs may need "
                         f"a CUDA device, and {why}. A CPU worker consumes -Q {worker_queues('cpu')}.")


@signals.worker_process_init.connect
def _heartbeat_in_pool_process(sender=None, **_) -> None:
    # prefork: each pool process beats, so a node counts as live while it can run jobs.
    start_heartbeat(str(sender), settings)


@signals.worker_ready.connect
def _heartbeat_in_main_process(sender=None, **_) -> None:
    # solo and threads pools run jobs in the main process, which sends no worker_process_init.
    start_heartbeat(str(sender.hostname), settings)


@signals.worker_ready.connect
def _say_whether_the_memory_is_durable(sender=None, **_) -> None:
    # Checked again before every memory job (workers.runtime); said once at start so that an
    # operator reads it in the worker's log before the first job fails with memory_unavailable.
    try:
        problems = durability_problems(redis.Redis.from_url(settings.redis_url, socket_timeout=5),
                                       check=settings.memory_durability_check)
    except redis.RedisError as exc:
        log.warning("could not check whether Redis keeps memory commits (%s); checked again per job", exc)
        return
    if problems:
        log.warning("the certificate memory is refused on this Redis: %s", MemoryUnavailable(problems))
    else:
        log.info("Redis keeps memory commits (appendonly, appendfsync always, noeviction, master)")
