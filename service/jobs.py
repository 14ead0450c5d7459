"""The API's side of a job: submit (per-key rate and quota, the queue its numeric mode needs,
queue limit, store, enqueue by name), find (only the caller's own, only of the route's kind),
long-poll, cancel.

Store and broker calls block, so the async routes run them in the thread pool; a long poll
holds no thread while it sleeps.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any

import anyio
from starlette.concurrency import run_in_threadpool

from service import queue
from service.config import Settings
from service.deps import Caller
from service.errors import APIError, NotFound, TooManyRequests, Unavailable
from service.parameters import model_spec
from service.schemas import JobStatus
from service.store import TERMINAL, JobKind, JobRecord, ModelRecord, QueueFull, Store
from smoothcert.manifest import ModelSpec

POLL_SECONDS = 0.1
QUEUE_RETRY_AFTER = "10"
_JOB_ID = re.compile(r"[0-9a-f]{32}")


def _no_model(name: str) -> NotFound:
    return NotFound(f"no model named {name!r} is registered (GET /v1/models lists them)",
                    code="model_not_found")


def get_model(store: Store, name: str) -> ModelRecord:
    """The registered model (blocking; see find_model)."""
    record = store.get_model(name)
    if record is None:
        raise _no_model(name)
    return record


def get_model_spec(store: Store, name: str) -> tuple[ModelRecord, ModelSpec]:
    """The registered model and its checked spec, for a submission (blocking). The record is
    read from Redis every time, so a model replaced or deleted is seen at once; only parsing
    it (pydantic, then every check of `ModelSpec`, ~20 µs) is skipped when its bytes are the
    ones parsed before. The cached objects are shared: callers read them, never change them."""
    raw = store.get_model_json(name)
    if raw is None:
        raise _no_model(name)
    return _parse_model(raw)


@lru_cache(maxsize=64)
def _parse_model(raw: bytes) -> tuple[ModelRecord, ModelSpec]:
    record = ModelRecord.model_validate_json(raw)
    return record, model_spec(record)  # an unusable spec raises (500), and nothing is cached


async def find_model(store: Store, name: str) -> ModelRecord:
    return await run_in_threadpool(get_model, store, name)


def check_rate(store: Store, settings: Settings, caller: Caller) -> None:
    """Take one token of the caller's bucket for a job submission (SMOOTHCERT_RATE_LIMIT_*);
    429 with Retry-After when it is empty. Blocking; nothing when the limit is off."""
    rate = settings.rate_limit_per_second
    if not rate:
        return
    burst = settings.rate_burst
    wait = store.take_tokens(caller.owner, rate=rate, burst=burst)
    if wait > 0:
        raise TooManyRequests("rate_limited", f"this key may submit {burst} jobs at once, then {rate:g} "
                              f"per second (SMOOTHCERT_RATE_LIMIT_*); retry in {math.ceil(wait)} s", wait)


def reserve_slot(store: Store, settings: Settings, caller: Caller) -> str | None:
    """A place among the caller's open jobs (SMOOTHCERT_MAX_OPEN_JOBS_PER_KEY), to settle once
    the job is created or not; None when the quota is off. 429 when the caller is at it (a
    replayed Idempotency-Key too: the replay is only known once a place is held)."""
    limit = settings.max_open_jobs_per_key
    if not limit:
        return None
    slot = store.reserve_job_slot(caller.owner, limit)
    if slot is None:
        raise TooManyRequests("quota_exceeded", f"this key has {limit} jobs queued or running, its "
                              "limit (SMOOTHCERT_MAX_OPEN_JOBS_PER_KEY); wait for one to end or cancel one",
                              float(QUEUE_RETRY_AFTER))
    return slot


def choose_queue(settings: Settings, kind: JobKind, request: dict[str, Any]) -> str:
    """The queue of the job (service.queue.route, from its numeric mode and
    SMOOTHCERT_QUEUE_DEVICES); 422 numeric_mode_unavailable when no declared queue runs it."""
    try:
        return queue.route(kind, request.get("numeric_mode"), settings.queue_devices)
    except queue.NoQueue as exc:
        raise APIError(422, "numeric_mode_unavailable", str(exc)) from None


def submit_blocking(store: Store, settings: Settings, caller: Caller, kind: JobKind, model: ModelRecord,
                    request: dict[str, Any], input_bytes: bytes, idempotency_key: str | None,
                    seed_given: bool) -> JobRecord:
    """`submit` without the thread pool, for a caller already in it."""
    target = choose_queue(settings, kind, request)  # before anything is stored or held
    slot, created_id = reserve_slot(store, settings, caller), None
    try:
        job, created = store.create_job(kind, model=model.name, digest=model.digest, request=request,
                                        input_bytes=input_bytes, owner=caller.owner,
                                        idempotency_key=idempotency_key, max_open=settings.max_queue,
                                        queue=target)
        created_id = job.id if created else None
    except QueueFull:
        raise APIError(429, "queue_full", f"the queue holds {settings.max_queue} open jobs, its "
                       "limit; retry later", headers={"Retry-After": QUEUE_RETRY_AFTER}) from None
    finally:
        if slot is not None:
            store.settle_job_slot(caller.owner, slot, created_id)
    if not created:
        _check_replay(store, job, kind, model, request, input_bytes, seed_given)
        if job.status == "queued" and not store.was_enqueued(job.id):
            # The process that stored it died before queueing it (a SIGKILL between the two
            # steps): queue it now, or it waits forever. A replay racing a live first attempt
            # may queue it twice: harmless, a job ends once however often it is delivered.
            _enqueue(store, settings, caller, kind, job, idempotency_key)
        return job
    _enqueue(store, settings, caller, kind, job, idempotency_key)
    return job


def _enqueue(store: Store, settings: Settings, caller: Caller, kind: JobKind, job: JobRecord,
             idempotency_key: str | None) -> None:
    """Send the job's task and record that it was sent; if the broker refuses, fail the job."""
    try:
        # The queue stored with the job: a replay sends it where the first attempt chose.
        queue.enqueue(settings.redis_url, settings.visibility_timeout, kind, job.id, job.queue)
    except Exception as exc:  # broker down or refusing: the job must not wait forever
        store.finish_job(job.id, "failed", only_if="queued", error={
            "code": "enqueue_failed", "message": f"the job could not be queued ({type(exc).__name__})"})
        if idempotency_key is not None:  # a retry with the same key must get a new job
            store.release_idempotency_key(caller.owner, idempotency_key, job.id)
        raise Unavailable("the job could not be queued (the broker is not reachable); retry shortly",
                          code="enqueue_failed") from exc
    store.mark_enqueued(job.id)


def _check_replay(store: Store, job: JobRecord, kind: str, model: ModelRecord,
                  request: dict[str, Any], input_bytes: bytes, seed_given: bool) -> None:
    """A reused Idempotency-Key must come with the same request (a drawn seed aside)."""
    def comparable(r: dict[str, Any]) -> dict[str, Any]:
        return r if seed_given else {k: v for k, v in r.items() if k != "seed"}

    same = (job.kind == kind and job.model == model.name and job.digest == model.digest
            and comparable(job.request) == comparable(request)
            and store.get_input(job.id) in (input_bytes, None))
    if not same:
        raise APIError(409, "idempotency_conflict", "this Idempotency-Key was used for a "
                       "different request; use a new key for a new request")


async def submit(store: Store, settings: Settings, caller: Caller, kind: JobKind,
                 model: ModelRecord, request: dict[str, Any], input_bytes: bytes,
                 idempotency_key: str | None, *, seed_given: bool) -> JobRecord:
    """Store and enqueue a job (or return the job of a replayed Idempotency-Key)."""
    return await run_in_threadpool(submit_blocking, store, settings, caller, kind, model, request,
                                   input_bytes, idempotency_key, seed_given)


async def find(store: Store, caller: Caller, kind: JobKind, job_id: str) -> JobRecord:
    """The caller's job of this kind; anything else is 404, so no other job is revealed."""
    job = await run_in_threadpool(store.get_job, job_id) if _JOB_ID.fullmatch(job_id) else None
    if job is None or job.kind != kind or job.owner != caller.owner:
        raise NotFound(f"no {kind} with id {job_id!r}", code="job_not_found")
    return job


async def wait(store: Store, caller: Caller, kind: JobKind, job_id: str, seconds: float) -> JobRecord:
    """The job once it has ended, or as it is after `seconds`."""
    deadline = anyio.current_time() + seconds
    while True:
        job = await find(store, caller, kind, job_id)
        left = deadline - anyio.current_time()
        if job.status in TERMINAL or left <= 0:
            return job
        await anyio.sleep(min(POLL_SECONDS, left))


async def cancel(store: Store, caller: Caller, kind: JobKind, job_id: str) -> JobRecord:
    await find(store, caller, kind, job_id)
    await run_in_threadpool(store.request_cancel, job_id)
    return await find(store, caller, kind, job_id)


def shown_request(job: JobRecord) -> dict[str, Any]:
    """The request as a status shows it. A seed the service drew for the shared memory stays
    hidden (None) until the job has succeeded, its entry committed: seen earlier, a caller
    could replay it with the memory off and cancel the job unless the draw were lucky."""
    request = job.request
    hide = (job.kind == "certification" and request.get("memory") and request.get("seed_source") == "server"
            and job.status != "succeeded")
    return {**request, "seed": None} if hide else request


def status(job: JobRecord) -> JobStatus:
    error = None
    if job.error is not None:
        error = {"code": str(job.error.get("code", "failed")), "message": str(job.error.get("message", ""))}
    return JobStatus(
        id=job.id, kind=job.kind, status=job.status,
        progress=job.progress.model_dump() if job.progress else None,
        result=job.result, error=error, model={"name": job.model, "digest": job.digest},
        request=shown_request(job), created=job.created, started=job.started, finished=job.finished,
    )
