"""An evaluation job run by the worker code: summary as the result, artifacts stored,
progress in examples, cancel between batches."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest

from service.config import Settings
from service.store import Store
from service.up import DEMO_BUNDLE, register_bundle
from smoothcert.data import load_data
from workers.jobs import run_job
from workers.runtime import ModelRuntime


def submit(store: Store, request: dict, count: int = 6) -> str:
    data = load_data("sklearn-digits", "test")
    out = io.BytesIO()
    np.savez(out, x=data.x[:count], y=data.y[:count])
    model = store.get_model("digits")
    base = {"sigma": 0.25, "sigma_search": None, "bound": "cohen", "n0": 50, "n": 300, "alpha": 0.01,
            "batch_size": 300, "memory": False, "seed": 3, "every": 1, "limit": None}
    job, _ = store.create_job("evaluation", model="digits", digest=model.digest, request=base | request,
                              input_bytes=out.getvalue())
    return job.id


def test_evaluation_job_end_to_end(redis_client):
    settings = Settings(device="cpu")
    store = Store(redis_client)
    register_bundle(store, DEMO_BUNDLE)
    job_id = submit(store, {"every": 2})
    assert run_job(store, ModelRuntime(store, settings), job_id, settings) == "succeeded"
    job = store.get_job(job_id)
    summary = job.result
    assert summary["count"] == 3 and summary["parameters"]["every"] == 2
    assert summary["acr"] >= 0 and summary["certified_accuracy"][0]["radius"] == 0
    assert job.progress.stage == "evaluation" and (job.progress.samples_done, job.progress.samples_total) == (3, 3)
    assert store.get_artifact(job_id, "curve.png").startswith(b"\x89PNG")
    assert store.get_artifact(job_id, "results.tsv").decode().startswith("idx\tlabel\tpredict\tradius")
    assert store.metrics()["counters"]["answered_total:evaluation"] == 1


@pytest.mark.parametrize("sampling, recorded", [
    ({"sampling": "adaptive", "tolerance": 0.1}, ("adaptive", 0.1, None)),
    ({"sampling": "sequential", "target_radius": 0.1}, ("sequential", None, 0.1)),
])
def test_evaluation_job_with_adaptive_or_sequential_sampling(redis_client, sampling, recorded):
    settings = Settings(device="cpu")
    store = Store(redis_client)
    register_bundle(store, DEMO_BUNDLE)
    job_id = submit(store, {"n": 5000, **sampling}, count=2)
    assert run_job(store, ModelRuntime(store, settings), job_id, settings) == "succeeded"
    summary = store.get_job(job_id).result
    p = summary["parameters"]
    assert (p["sampling"], p["tolerance"], p["target_radius"]) == recorded
    assert summary["samples"]["estimation_mean"] < 5000
    if sampling["sampling"] == "adaptive":  # sequential: the deciding look's n ≤ the votes drawn
        assert summary["samples"]["mean"] == 50 + summary["samples"]["estimation_mean"]
    assert "\tseed\tn\n" in store.get_artifact(job_id, "results.tsv").decode()


def test_evaluation_job_cancels_between_batches(redis_client):
    settings = Settings(device="cpu")
    store = Store(redis_client)
    register_bundle(store, DEMO_BUNDLE)
    job_id = submit(store, {"n": 1_000_000, "batch_size": 100})
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(
        run_job(store, ModelRuntime(store, settings), job_id, settings)))
    worker.start()
    deadline = time.monotonic() + 60
    while store.get_job(job_id).progress is None and time.monotonic() < deadline:
        time.sleep(0.05)
    store.request_cancel(job_id)  # the job is running: it stops at its next batch
    worker.join(60)
    assert outcome == ["cancelled"] and store.get_artifact(job_id, "curve.png") is None
