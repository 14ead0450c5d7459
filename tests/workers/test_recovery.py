"""Lost task messages queued again (workers/recovery.py): only queued jobs older than the
grace period that no message names, waiting in any device's queue or unacknowledged, each to
the queue it was submitted to; and the heartbeat runs it after Redis restarts."""

from __future__ import annotations

import json
import time

import pytest

from service.queue import enqueue
from service.store import Store
from tests.redis_server import RedisServer
from tests.workers.helpers import constant, new_job, settings_for, wait_for
from workers import heartbeat
from workers.recovery import requeue_lost


def test_only_queued_jobs_no_message_names_are_queued_again(store, settings, digest, redis_client):
    lost = new_job(store, digest, constant(0.8))  # stored, its message lost
    waiting = new_job(store, digest, constant(0.8))
    enqueue(settings.redis_url, settings.visibility_timeout, "certification", waiting)
    delivered = new_job(store, digest, constant(0.8))  # a worker holds its message, not started yet
    redis_client.hset("unacked", "tag-1", json.dumps([{"headers": {"argsrepr": repr([delivered])}}, "", "x"]))
    running = new_job(store, digest, constant(0.8))
    store.start_job(running)
    assert requeue_lost(store, settings, min_age=3600) == []  # all younger than the grace period
    assert requeue_lost(store, settings, min_age=0) == [lost]
    messages = redis_client.lrange("certifications", 0, -1)
    assert len(messages) == 2 and lost.encode() in messages[0] and store.was_enqueued(lost)
    assert requeue_lost(store, settings, min_age=0) == []  # its message now waits in the queue


def test_a_lost_job_goes_back_to_the_queue_it_was_submitted_to(store, settings, digest, redis_client):
    """The queue stored with the job at submit, not one this worker's settings would choose
    (it runs with SMOOTHCERT_QUEUE_DEVICES=cpu); a record from before queues had devices goes
    to its kind's CPU queue. A message waiting on a CUDA queue is seen as held."""
    def stored(kind: str, queue: str | None, mode: str = "fp16") -> str:
        job, _ = store.create_job(kind, model="tiny", digest=digest, request={"numeric_mode": mode},
                                  input_bytes=b"x", queue=queue)
        return job.id

    cuda_cert, cuda_pred = stored("certification", "certifications-cuda"), stored("prediction", "predictions-cuda")
    legacy = stored("certification", None, "fp32")
    waiting = stored("certification", "certifications-cuda")
    enqueue(settings.redis_url, settings.visibility_timeout, "certification", waiting, "certifications-cuda")
    assert settings.queue_devices == ["cpu"]
    assert sorted(requeue_lost(store, settings, min_age=0)) == sorted([cuda_cert, cuda_pred, legacy])
    def named(queue: str) -> list[str]:
        """The job ids named by the messages waiting in `queue`, in any order."""
        ids = (cuda_cert, cuda_pred, legacy, waiting)
        return sorted(i for m in redis_client.lrange(queue, 0, -1) for i in ids if i.encode() in m)

    assert named("certifications-cuda") == sorted([cuda_cert, waiting])
    assert named("predictions-cuda") == [cuda_pred]
    assert named("certifications") == [legacy] and named("predictions") == []
    assert requeue_lost(store, settings, min_age=0) == []


@pytest.mark.timeout(60)
def test_the_heartbeat_queues_lost_jobs_again_after_a_restart(tmp_path, bundle, monkeypatch):
    server = RedisServer(tmp_path)
    server.start()
    monkeypatch.setattr(heartbeat, "_running", {})
    settings = settings_for(server.url, heartbeat_seconds=0.2)
    store = Store.from_url(server.url)
    digest, spec, data = bundle
    store.put_model("tiny", digest, spec, data)
    stop = heartbeat.start_heartbeat("hb@test", settings, recovery_grace=0.5)
    try:
        wait_for(lambda: "hb@test" in store.live_workers(within_seconds=1), 10, "a first beat")
        time.sleep(1.0)  # past the pass a worker makes once after it starts
        lost = new_job(store, digest, constant(0.8))
        time.sleep(1.0)
        assert store.queue_depth("certifications") == 0  # no outage, no pass until the next period
        server.stop()
        server.start()
        wait_for(lambda: store.queue_depth("certifications") == 1, 15, "the lost job to be queued again")
        assert lost.encode() in store.r.lindex("certifications", 0)
    finally:
        stop.set()
        server.stop()


@pytest.mark.timeout(60)
def test_a_starting_worker_queues_a_job_an_api_stored_and_never_queued(store, settings, digest, monkeypatch):
    lost = new_job(store, digest, constant(0.8))  # an API stored it, then died before queueing it
    monkeypatch.setattr(heartbeat, "_running", {})
    stop = heartbeat.start_heartbeat("hb@start", settings.model_copy(update={"heartbeat_seconds": 0.2}),
                                     recovery_grace=0.5)
    try:
        # The pass publishes, then marks the job as enqueued: wait for both, not just the first.
        wait_for(lambda: store.queue_depth("certifications") == 1 and store.was_enqueued(lost), 15,
                 "the job to be queued and marked by the start pass")
        assert lost.encode() in store.r.lindex("certifications", 0)
    finally:
        stop.set()
