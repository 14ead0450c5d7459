"""Workers through a Redis restart (a private redis-server, append-only on, stopped with
SIGTERM and started again on the same port): a running job pauses and goes on; an outage
longer than the store's retries leaves the job unended for redelivery, never failed; the
task then hands its message back; the heartbeat thread lives through it; a real Celery
worker (as `smoothcert up` runs it) reconnects and acknowledges the job it was running."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis
from celery.exceptions import Reject

from service.queue import enqueue
from service.store import TERMINAL, Store
from service.up import worker_command
from tests.redis_server import RedisServer
from tests.workers.helpers import constant, namespace, new_job, settings_for, wait_for
from workers import heartbeat, tasks
from workers.jobs import run_job
from workers.runtime import ModelRuntime
from workers.shared_memory import decode_entry


@pytest.fixture()
def server(tmp_path):
    s = RedisServer(tmp_path)
    s.start()
    yield s
    s.stop()


def _stack(server: RedisServer, bundle, retry_seconds: float):
    settings = settings_for(server.url, redis_retry_seconds=retry_seconds)
    store = Store.from_url(server.url, retry_seconds=retry_seconds)
    digest, spec, data = bundle
    store.put_model("tiny", digest, spec, data)
    return settings, store, ModelRuntime(store, settings), digest


def _run_in_thread(store, runtime, job_id, settings) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target():
        try:
            outcome["status"] = run_job(store, runtime, job_id, settings)
        except Exception as e:  # the test looks at what came out
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def _stop_mid_run(server: RedisServer, job_id: str) -> float:
    """Stop Redis once the job is sampling its estimation batches; returns the stop time."""
    probe = redis.Redis.from_url(server.url)
    wait_for(lambda: b"estimation" in (probe.hget(f"sc:job:{job_id}", "progress") or b""), 60,
             "the job to sample", interval=0.01)
    probe.close()
    server.stop()
    return time.time()


@pytest.mark.timeout(120)
def test_a_job_rides_out_a_redis_restart(server, bundle):
    settings, store, runtime, digest = _stack(server, bundle, retry_seconds=30)
    job_id = new_job(store, digest, constant(0.8), memory=True, n=200_000, batch_size=20)
    thread, outcome = _run_in_thread(store, runtime, job_id, settings)
    stopped = _stop_mid_run(server, job_id)
    time.sleep(1.5)
    server.start()
    thread.join(90)
    assert outcome == {"status": "succeeded"}
    job = store.get_job(job_id)
    assert job.started < stopped < job.finished  # it really ran across the outage
    assert job.result["samples"] == 200_050 and job.result["memory"]["outcome"] == "new"
    entries = [decode_entry(b) for b in store.memory_entries(namespace(digest))]
    assert [e.job_id for e in entries] == [job_id]


@pytest.mark.timeout(120)
def test_an_outage_past_the_retries_leaves_the_job_for_redelivery(server, bundle):
    settings, store, runtime, digest = _stack(server, bundle, retry_seconds=0.5)
    job_id = new_job(store, digest, constant(0.8), memory=True, n=200_000, batch_size=20)
    thread, outcome = _run_in_thread(store, runtime, job_id, settings)
    stopped = _stop_mid_run(server, job_id)
    thread.join(30)
    assert isinstance(outcome.get("error"), redis.ConnectionError)  # raised, not turned into "failed"
    assert time.time() - stopped < 10  # the retries gave up in about their 0.5 s
    server.start()
    job = store.get_job(job_id)
    assert (job.status, job.error, job.result) == ("running", None, None)
    # The redelivered task runs it again, to its one end.
    assert run_job(store, runtime, job_id, settings) == "succeeded"
    assert [decode_entry(b).job_id for b in store.memory_entries(namespace(digest))] == [job_id]


def test_a_redis_error_past_the_retries_never_fails_the_job(store, runtime, settings, digest, monkeypatch):
    # Redis is back by the time the error reaches run_job: the job must not end "internal".
    job_id = new_job(store, digest, constant(0.8), n=2000, batch_size=100)

    def gone(job_id: str) -> bool:
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(store, "cancel_requested", gone)
    with pytest.raises(redis.ConnectionError):
        run_job(store, runtime, job_id, settings)
    job = store.get_job(job_id)
    assert (job.status, job.error, job.result) == ("running", None, None)
    monkeypatch.undo()
    assert run_job(store, runtime, job_id, settings) == "succeeded"


def test_the_task_hands_its_message_back_when_redis_stays_away(monkeypatch):
    class Task:
        def resources(self):
            return None, None

    monkeypatch.setattr(tasks, "run_job", lambda *a: "succeeded")
    assert tasks.run(Task(), "j1") == "succeeded"

    def away(*args):
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(tasks, "run_job", away)
    with pytest.raises(Reject) as caught:
        tasks.run(Task(), "j1")
    assert caught.value.requeue is True


@pytest.mark.timeout(60)
def test_the_heartbeat_lives_through_an_outage(server, monkeypatch):
    monkeypatch.setattr(heartbeat, "_running", {})  # this process's heartbeat, started afresh
    settings = settings_for(server.url, heartbeat_seconds=0.2)
    stop = heartbeat.start_heartbeat("hb@test", settings)
    try:
        store = Store.from_url(server.url)
        wait_for(lambda: "hb@test" in store.live_workers(within_seconds=1), 10, "a first beat")
        server.stop()
        time.sleep(1.0)  # several beats fail
        server.start()
        back = time.time()
        wait_for(lambda: store.r.zscore("sc:workers", "hb@test") > back, 10, "a beat after the restart")
    finally:
        stop.set()


@pytest.mark.timeout(240)
def test_a_celery_worker_reconnects_and_finishes_its_job(server, bundle, tmp_path):
    _, store, _, digest = _stack(server, bundle, retry_seconds=30)
    log = tmp_path / "worker.log"
    env = os.environ | {"SMOOTHCERT_REDIS_URL": server.url, "SMOOTHCERT_VISIBILITY_TIMEOUT_SECONDS": "600",
                        "SMOOTHCERT_HEARTBEAT_SECONDS": "1", "SMOOTHCERT_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    with open(log, "ab") as out:
        proc = subprocess.Popen(worker_command("outage@%h"), cwd=Path(__file__).resolve().parents[2], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or " ready." in log.read_text(), 90, "the worker")
        assert proc.poll() is None, log.read_text()[-3000:]
        # One job running (its message unacknowledged) and the consumer idle, waiting on the
        # broker, when Redis goes away.
        running = new_job(store, digest, constant(0.8), n=200_000, batch_size=20)
        enqueue(server.url, 600, "certification", running)
        _stop_mid_run(server, running)
        time.sleep(2)
        server.start()
        after = new_job(store, digest, constant(0.2))
        enqueue(server.url, 600, "certification", after)
        wait_for(lambda: proc.poll() is not None or all(store.get_job(j).status in TERMINAL for j in (running, after)),
                 120, "both jobs to end")
        assert proc.poll() is None, "the worker stopped:\n" + log.read_text()[-3000:]
        assert [store.get_job(j).status for j in (running, after)] == ["succeeded", "succeeded"]
        wait_for(lambda: store.r.hlen("unacked") == 0, 30, "the running job's message to be acknowledged")
        assert log.read_text().count("] Connected to ") >= 2  # the consumer reconnected
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
