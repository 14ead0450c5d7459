"""The testing hook of workers/failpoints.py: inert by default; when set, a job holds still
between its memory commit and its result, which is what reliability/worker_crash.py kills in."""

from __future__ import annotations

import threading
import time

from service.config import get_settings
from tests.workers.helpers import constant, namespace, new_job
from workers.jobs import run_job


def test_the_pause_is_off_by_default(monkeypatch):
    monkeypatch.delenv("SMOOTHCERT_PAUSE_AFTER_COMMIT_SECONDS", raising=False)
    get_settings.cache_clear()
    assert get_settings().pause_after_commit_seconds == 0


def test_a_job_pauses_after_its_commit_before_its_result(monkeypatch, store, runtime, settings, digest):
    monkeypatch.setenv("SMOOTHCERT_PAUSE_AFTER_COMMIT_SECONDS", "1.0")
    get_settings.cache_clear()
    try:
        job_id = new_job(store, digest, constant(0.8), memory=True)
        worker = threading.Thread(target=run_job, args=(store, runtime, job_id, settings))
        worker.start()
        deadline = time.monotonic() + 30
        while store.memory_entry_of(namespace(digest), job_id) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.memory_entry_of(namespace(digest), job_id) == 0
        assert store.get_job(job_id).status == "running"  # committed, no result yet
        worker.join(30)
        job = store.get_job(job_id)
        assert job.status == "succeeded" and job.result["memory"]["entry"] == "0"
    finally:
        get_settings.cache_clear()
