"""The Celery tasks: thin, by name, carrying only a job id; the logic lives in plain functions.

`job_task` is the one place that sets task policy (name, queue, acks, retries); the tasks
re-fetch the job from the store and leave the work to `workers.jobs.run_job`.

Redis outages: the store retries each call for `redis_retry_seconds` (a restart pauses a job,
which then goes on); an outage that outlasts that leaves the job as it is and gives its
message back to the broker (requeued, or redelivered after the visibility timeout if the
broker cannot take it back yet), so that it runs again and ends once, never failed half done.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import redis
from celery import Task
from celery.exceptions import Reject

from service.config import get_settings
from service.queue import CERTIFY_TASK, EVALUATE_TASK, PREDICT_TASK, QUEUES
from service.store import Store
from workers.celery_app import app
from workers.jobs import run_job
from workers.runtime import ModelRuntime


class WorkerTask(Task):
    """Base of the job tasks: holds this process's Store and model runtime, made on first
    use, i.e. inside the pool process after the fork, and shared by all job tasks."""

    _pid: int | None = None
    _store: Store | None = None
    _runtime: ModelRuntime | None = None

    def resources(self) -> tuple[Store, ModelRuntime]:
        holder = WorkerTask  # class attributes: one set per process, not per task
        if holder._pid != os.getpid():
            settings = get_settings()
            holder._store = Store.from_url(settings.redis_url, prefix=settings.key_prefix,
                                           job_ttl_seconds=settings.job_ttl_seconds,
                                           retry_seconds=settings.redis_retry_seconds)
            holder._runtime = ModelRuntime(holder._store, settings)
            holder._pid = os.getpid()
        return holder._store, holder._runtime


def job_task(name: str) -> Callable[[Callable], Task]:
    """Register `fn(self, job_id)` as task `name` with the project's policy: its queue;
    acknowledged after it ran and requeued if its process dies (a job ends once however
    often it runs); no retries (a failure is the job's result, stored with it); no result
    backend (results live in the job record)."""
    return app.task(name=name, base=WorkerTask, bind=True, queue=QUEUES[name],
                    acks_late=True, reject_on_worker_lost=True, ignore_result=True,
                    max_retries=0)


def run(task: WorkerTask, job_id: str) -> str | None:
    """`run_job`; a Redis outage that outlasted the store's retries requeues the message."""
    try:
        store, runtime = task.resources()
        return run_job(store, runtime, job_id, get_settings())
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise Reject(f"Redis unreachable ({type(e).__name__}); job {job_id} left for redelivery",
                     requeue=True) from e


@job_task(CERTIFY_TASK)
def certify(self: WorkerTask, job_id: str) -> str | None:
    return run(self, job_id)


@job_task(PREDICT_TASK)
def predict(self: WorkerTask, job_id: str) -> str | None:
    return run(self, job_id)


@job_task(EVALUATE_TASK)
def evaluate(self: WorkerTask, job_id: str) -> str | None:
    return run(self, job_id)
