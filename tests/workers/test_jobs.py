"""`run_job` against a real redis-server: results, progress, cancel, and every error code."""

from __future__ import annotations

import numpy as np
import pytest
from celery.exceptions import SoftTimeLimitExceeded

from service.store import Store
from tests.workers.helpers import constant, distance_to_boundary, namespace, new_job, store_for
from workers.jobs import ProgressWriter, run_job
from workers.runtime import ModelRuntime


def test_certification_result_has_the_contract_fields(store, runtime, settings, digest):
    x = constant(0.8)
    job_id = new_job(store, digest, x, n=2000)
    assert run_job(store, runtime, job_id, settings) == "succeeded"
    job = store.get_job(job_id)
    r = job.result
    assert {"prediction", "label", "abstained", "radius", "sigma", "p_a_lower", "bound", "n0",
            "n", "alpha", "memory", "model", "seed", "numeric_mode", "batch_size", "p_b_upper",
            "p_a_lower_halves", "search", "samples", "seconds"} <= set(r)
    assert (r["prediction"], r["label"], r["abstained"]) == (1, "high", False)
    assert 0 < r["radius"] <= distance_to_boundary(x)  # exact model: never above the truth
    assert (r["sigma"], r["bound"], r["n0"], r["n"], r["alpha"], r["seed"]) == (0.25, "cohen", 50, 2000, 0.001, 7)
    assert r["memory"] == {"used": False}
    assert r["model"] == {"name": "tiny", "digest": digest}
    assert r["samples"] == 2050 and job.error is None and job.status == "succeeded"
    assert job.progress is not None and job.progress.stage in ("selection", "estimation")
    counters = store.metrics()["counters"]
    assert counters["samples_total"] == 2050 and counters["answered_total:certification"] == 1
    assert counters["jobs_finished_total:certification:succeeded"] == 1


def test_adaptive_sampling_reaches_the_certificate(store, runtime, settings, digest):
    x = constant(0.7)
    job_id = new_job(store, digest, x, n=20_000, sampling="adaptive", tolerance=0.1)
    assert run_job(store, runtime, job_id, settings) == "succeeded"
    r = store.get_job(job_id).result
    assert (r["sampling"], r["n_max"], r["tolerance"]) == ("adaptive", 20_000, 0.1)
    assert 0 < r["n"] < 20_000 and r["samples"] == 50 + r["n"]
    assert 0 < r["radius"] <= distance_to_boundary(x)
    fixed = new_job(store, digest, x, n=2000)
    run_job(store, runtime, fixed, settings)
    r = store.get_job(fixed).result
    assert (r["sampling"], r["n"], r["n_max"], r["tolerance"]) == ("fixed", 2000, 2000, None)
    assert (r["target_radius"], r["look_alpha"]) == (None, None)


def test_sequential_sampling_reaches_the_certificate(store, runtime, settings, digest):
    x = constant(0.7)
    job_id = new_job(store, digest, x, n=20_000, sampling="sequential", target_radius=0.3)
    assert run_job(store, runtime, job_id, settings) == "succeeded"
    r = store.get_job(job_id).result
    assert (r["sampling"], r["n_max"], r["target_radius"], r["tolerance"]) == ("sequential", 20_000, 0.3, None)
    assert 0.3 <= r["radius"] <= distance_to_boundary(x)  # reached the target: stopped at an early look
    assert 0 < r["n"] < 20_000 and r["samples"] >= 50 + r["n"]
    assert 0 < r["look_alpha"] < r["alpha"]


def test_same_seed_same_certificate(store, runtime, settings, digest):
    a, b = (new_job(store, digest, constant(0.6), seed=11) for _ in range(2))
    for job_id in (a, b):
        run_job(store, runtime, job_id, settings)
    ra, rb = store.get_job(a).result, store.get_job(b).result
    assert ra["radius"] == rb["radius"] and ra["p_a_lower"] == rb["p_a_lower"]


def test_prediction_result(store, runtime, settings, digest):
    job_id = new_job(store, digest, constant(0.2), kind="prediction", n=500)
    assert run_job(store, runtime, job_id, settings) == "succeeded"
    r = store.get_job(job_id).result
    assert (r["prediction"], r["label"], r["abstained"], r["n"], r["counts"]) == (0, "low", False, 500, [500, 0])
    assert r["p_value"] < r["alpha"] and r["model"]["digest"] == digest and "radius" not in r


def test_sigma_search_result_records_the_search(store, runtime, settings, digest):
    job_id = new_job(store, digest, constant(0.7), sigma_search={"method": "ddrs", "steps": 5},
                     memory=True)
    assert run_job(store, runtime, job_id, settings) == "succeeded"
    r = store.get_job(job_id).result
    assert r["search"]["method"] == "ddrs" and r["search"]["steps"] == 5
    assert r["sigma"] == r["search"]["sigma"] and 0.05 <= r["sigma"] <= 1.0
    assert r["memory"]["used"] and r["memory"]["outcome"] == "new" and r["memory"]["entry"] == "0"
    progress = store.get_job(job_id).progress
    assert (progress.stage, progress.samples_done) == ("memory", r["samples"])


class CancelAfter(Store):
    """Sets the job's cancel flag right after the `after`-th check, as if a DELETE arrived
    between two batches; counts the checks."""

    after, checks = 5, 0

    def cancel_requested(self, job_id: str) -> bool:
        self.checks += 1
        flagged = super().cancel_requested(job_id)
        if self.checks == self.after:
            self.request_cancel(job_id)
        return flagged


def test_cancel_stops_within_one_batch(redis_client, settings, digest):
    store = CancelAfter(redis_client, prefix=settings.key_prefix)
    job_id = new_job(store, digest, constant(0.8), n=100_000, batch_size=10)
    assert run_job(store, ModelRuntime(store, settings), job_id, settings) == "cancelled"
    job = store.get_job(job_id)
    assert store.checks == store.after + 1  # the very next check stopped it
    assert job.error == {"code": "cancelled", "message": "cancelled by the client"} and job.result is None


def test_an_ended_job_is_not_run_again(store, runtime, settings, digest):
    cancelled = new_job(store, digest, constant(0.8))
    store.request_cancel(cancelled)  # queued: ends at once
    assert run_job(store, runtime, cancelled, settings) == "cancelled"
    assert store.get_job(cancelled).started is None
    done = new_job(store, digest, constant(0.8))
    run_job(store, runtime, done, settings)
    first = store.get_job(done)
    assert run_job(store, runtime, done, settings) == "succeeded"
    assert store.get_job(done).result == first.result and store.get_job(done).finished == first.finished
    assert store.metrics()["counters"]["jobs_finished_total:certification:succeeded"] == 1
    assert run_job(store, runtime, "no-such-job", settings) is None


@pytest.mark.parametrize("request_, x, message", [
    ({"n": 5}, constant(0.8), "can never certify"),
    ({"sigma": 5.0}, constant(0.8), "outside the model's range"),
    ({"sigma_search": {"method": "nope"}}, constant(0.8), "sigma_search.method"),
    ({"bound": "drs"}, constant(0.8), "DRS bundle"),
    ({"sampling": "sometimes"}, constant(0.8), "sampling must be one of"),
    ({"sampling": "sequential"}, constant(0.8), "needs target_radius"),
    ({"sampling": "sequential", "target_radius": -1.0}, constant(0.8), "target_radius"),
    ({"target_radius": 0.5}, constant(0.8), "target_radius applies"),
    ({"sampling": "adaptive", "tolerance": -1.0}, constant(0.8), "tolerance"),
    ({}, np.zeros((1, 3, 3), np.float32), "input has shape"),
])
def test_refused_requests_fail_as_invalid_request(store, runtime, settings, digest, request_, x, message):
    job_id = new_job(store, digest, x, **request_)
    assert run_job(store, runtime, job_id, settings) == "failed"
    error = store.get_job(job_id).error
    assert error["code"] == "invalid_request" and message in error["message"]


def test_bad_bundles_fail_as_bad_model(store, runtime, settings, bundle):
    _, spec, _ = bundle
    store.put_model("broken", "sha256:broken", spec, b"not a zip")
    broken = new_job(store, "sha256:broken", constant(0.8), model="broken")
    missing = new_job(store, "sha256:missing", constant(0.8), model="gone")
    for job_id in (broken, missing):
        assert run_job(store, runtime, job_id, settings) == "failed"
        assert store.get_job(job_id).error["code"] == "bad_model"
    assert "zip" in store.get_job(broken).error["message"]


def test_full_memory_fails_as_memory_full(store, settings, digest):
    small = settings.model_copy(update={"memory_capacity": 1})
    runtime = ModelRuntime(store, small)
    first = new_job(store, digest, constant(0.9), memory=True)
    second = new_job(store, digest, constant(0.1), memory=True)  # far from the first ball
    assert run_job(store, runtime, first, small) == "succeeded"
    assert run_job(store, runtime, second, small) == "failed"
    assert store.get_job(second).error["code"] == "memory_full"
    assert store.memory_size(namespace(digest))[0] == 1


class Failing(Store):
    """Raises `exc` where the engine checks for a cancel (between batches)."""

    exc: BaseException = RuntimeError("secret internal detail")

    def cancel_requested(self, job_id: str) -> bool:
        raise self.exc


@pytest.mark.parametrize("exc, code", [
    (SoftTimeLimitExceeded(), "time_limit"),
    (RuntimeError("secret internal detail"), "internal"),
])
def test_unexpected_failures_end_the_job_once(redis_client, settings, digest, exc, code, caplog):
    store = Failing(redis_client, prefix=settings.key_prefix)
    store.exc = exc
    job_id = new_job(store, digest, constant(0.8))
    assert run_job(store, ModelRuntime(store, settings), job_id, settings) == "failed"
    error = store.get_job(job_id).error
    assert error["code"] == code and "secret" not in error["message"]
    if code == "time_limit":
        assert error["message"] == f"the job ran longer than {settings.job_time_limit_seconds} s"
    else:
        assert "secret internal detail" in caplog.text  # logged, not sent
    assert store.metrics()["counters"]["jobs_finished_total:certification:failed"] == 1


def test_progress_writes_are_throttled(store, settings, digest):
    job_id = new_job(store, digest, constant(0.8))
    store.start_job(job_id)
    writer = ProgressWriter(store_for(settings), job_id, interval=60)
    for done in range(100):
        writer("estimation", done, 100)
    assert store.get_job(job_id).progress.samples_done == 0  # only the first call wrote


def test_a_cancelled_job_shows_exactly_the_samples_it_did(redis_client, settings, digest):
    # The flag is set at the 8th check: 5 selection batches (n0 = 50), then 3 estimation
    # batches of 10 ran; the 9th check stops it. Throttled writes alone would show 10.
    store = CancelAfter(redis_client, prefix=settings.key_prefix)
    store.after = 8
    job_id = new_job(store, digest, constant(0.8), n=100_000, batch_size=10)
    assert run_job(store, ModelRuntime(store, settings), job_id, settings) == "cancelled"
    progress = store.get_job(job_id).progress
    assert (progress.stage, progress.samples_done, progress.samples_total) == ("estimation", 30, 100_000)


def test_a_timed_out_job_shows_exactly_the_samples_it_did(store, settings, digest):
    quick = settings.model_copy(update={"job_time_limit_seconds": 1})
    job_id = new_job(store, digest, constant(0.8), n=1_000_000, batch_size=10)
    runtime = ModelRuntime(store, quick)
    runtime.get(digest, None)  # loaded (and its batch size probed) before the 1 s starts
    assert run_job(store, runtime, job_id, quick) == "failed"
    job = store.get_job(job_id)
    assert job.error["code"] == "time_limit" and job.progress.stage == "estimation"
    assert 0 < job.progress.samples_done < 1_000_000 and job.progress.samples_done % 10 == 0


def test_progress_flush_writes_the_latest_values(store, settings, digest):
    job_id = new_job(store, digest, constant(0.8))
    store.start_job(job_id)
    writer = ProgressWriter(store_for(settings), job_id, interval=60)
    for done in range(0, 100, 10):
        writer("estimation", done, 100)
    writer.flush()
    assert store.get_job(job_id).progress.samples_done == 90
