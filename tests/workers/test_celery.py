"""A real Celery worker (prefork, as deployed) against the test redis-server: jobs enqueued
by name run to the end, the heartbeat shows, and a job whose whole worker is SIGKILLed
mid-run is handed to a new worker after the visibility timeout and ends exactly once."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from kombu.transport import redis as kombu_redis

from service.queue import enqueue
from service.store import TERMINAL
from tests.workers.helpers import constant, namespace, new_job, wait_for
from workers.celery_app import sweep_lock_seconds

ROOT = pathlib.Path(__file__).resolve().parents[2]
VISIBILITY = 5


@contextmanager
def celery_worker(redis_url: str, name: str, log: pathlib.Path) -> Iterator[subprocess.Popen]:
    """`celery worker` in its own process group, ready to consume; killed (whole group) on exit."""
    env = os.environ | {
        "SMOOTHCERT_REDIS_URL": redis_url, "SMOOTHCERT_VISIBILITY_TIMEOUT_SECONDS": str(VISIBILITY),
        "SMOOTHCERT_HEARTBEAT_SECONDS": "1", "SMOOTHCERT_DEVICE": "cpu", "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q",
           "certifications,predictions,evaluations", "--pool=prefork", "--concurrency=1", "-n", f"{name}@%h",
           "--loglevel=INFO", "--without-gossip", "--without-mingle"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"celery worker exited ({proc.returncode}):\n{log.read_text()}")
            return f"{name}@" in log.read_text() and " ready." in log.read_text()
        wait_for(ready, 60, f"worker {name} to be ready", interval=0.1)
        yield proc
    finally:
        kill_group(proc)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the worker and its pool processes, as a crashed machine would."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def wait_until_ended(store, job_id: str, timeout: float):
    return wait_for(lambda: (j := store.get_job(job_id)).status in TERMINAL and j, timeout,
                    f"job {job_id} to end")


def test_worker_runs_jobs_and_beats(store, digest, redis_url, tmp_path):
    with celery_worker(redis_url, "w1", tmp_path / "w1.log"):
        cert = new_job(store, digest, constant(0.8), memory=True)
        pred = new_job(store, digest, constant(0.2), kind="prediction")
        enqueue(redis_url, VISIBILITY, "certification", cert)
        enqueue(redis_url, VISIBILITY, "prediction", pred)
        c, p = wait_until_ended(store, cert, 60), wait_until_ended(store, pred, 60)
        assert (c.status, c.result["prediction"], c.result["memory"]["outcome"]) == ("succeeded", 1, "new")
        assert (p.status, p.result["prediction"], p.result["label"]) == ("succeeded", 0, "low")
        name = f"w1@{socket.gethostname()}"
        wait_for(lambda: name in store.live_workers(within_seconds=3), 10, "a heartbeat")


@pytest.mark.timeout(180)
def test_a_job_of_a_killed_worker_completes_once_elsewhere(store, digest, redis_url, tmp_path):
    # Slow on purpose: ~50k batches, each checking the cancel flag in Redis.
    job_id = new_job(store, digest, constant(0.8), memory=True, n=1_000_000, batch_size=20)
    with celery_worker(redis_url, "w1", tmp_path / "w1.log") as first:
        enqueue(redis_url, VISIBILITY, "certification", job_id)
        wait_for(lambda: (j := store.get_job(job_id)).status == "running" and j.progress
                 and j.progress.stage == "estimation" and j.progress.samples_done > 0,
                 60, "the job to be running")
        kill_group(first)
    assert store.get_job(job_id).status == "running"  # nobody finished it
    assert store.memory_entry_of(namespace(digest), job_id) is None
    with celery_worker(redis_url, "w2", tmp_path / "w2.log"):
        job = wait_until_ended(store, job_id, 120)
    assert job.status == "succeeded", job.error
    assert store.memory_entry_of(namespace(digest), job_id) == 0
    assert store.memory_size(namespace(digest))[0] == 1
    assert job.result["memory"]["entry"] == "0" and job.result["samples"] == 1_000_050
    finished = {k: v for k, v in store.metrics()["counters"].items() if k.startswith("jobs_finished_total")}
    assert finished == {"jobs_finished_total:certification:succeeded": 1}
    assert "Task smoothcert.certify[" in (tmp_path / "w2.log").read_text()  # the second worker ran it


def test_the_sweep_lock_expires_within_the_visibility_timeout():
    """A worker killed mid-sweep leaves the sweep's lock behind for its whole lifetime; with
    kombu's default (300 s) no job would be handed out again for five minutes (seen once
    in reliability/worker_crash.py). The app sets a short lifetime by an option kombu reads."""
    from workers.celery_app import app, settings

    assert "unacked_mutex_expire" in kombu_redis.Channel.from_transport_options
    expire = app.conf.broker_transport_options["unacked_mutex_expire"]
    assert expire == sweep_lock_seconds(settings.visibility_timeout) <= settings.visibility_timeout / 2
    assert [sweep_lock_seconds(v) for v in (1, 5, 10, 3900)] == [1, 2, 5, 60]
