"""Jobs on a remote model (smoothcert.remote) through the worker's `run_job`, the real store
and a real KServe model server on loopback: the result names what was certified, and every
way the remote side can fail ends the job with its own error code."""

from __future__ import annotations

import io
import json
import zipfile

import pytest

pytest.importorskip("kserve")

from tests.conftest import free_port
from tests.remote_server import RemoteServer
from tests.workers.helpers import constant, distance_to_boundary, new_job, settings_for
from workers.jobs import run_job
from workers.runtime import ModelRuntime


@pytest.fixture()
def server(kserve_server):
    return kserve_server


def register_remote(store, url: str, model: str = "tiny", **remote) -> str:
    spec = {"name": model, "kind": "remote", "input_shape": [1, 4, 4], "num_classes": 2,
            "labels": ["low", "high"], "sigma": {"default": 0.25, "min": 0.05, "max": 1.0},
            "remote": {"endpoint": url, "model": model, "input": "x", "output": "output", "max_batch": 250,
                       **remote}}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("model.json", json.dumps(spec))
    from smoothcert.archive import inspect_bundle, read_bundle_files

    _, _, digest = inspect_bundle(read_bundle_files(out.getvalue()))
    store.put_model(model, digest, spec, out.getvalue())
    return digest


def test_a_remote_certification_names_what_it_certified(store, redis_url, server):
    settings = settings_for(redis_url, remote_endpoints=[server.url])
    digest = register_remote(store, server.url)
    x = constant(0.58)
    job_id = new_job(store, digest, x, sigma=0.25, n=2000)
    assert run_job(store, ModelRuntime(store, settings), job_id, settings) == "succeeded"
    result = store.get_job(job_id).result
    assert result["prediction"] == 1 and 0 < result["radius"] <= distance_to_boundary(x)
    assert result["remote"]["endpoint"] == server.url and result["remote"]["model"] == "tiny"
    assert result["remote"]["canary_digest"].startswith("sha256:") and result["model"]["digest"] == digest


def test_remote_failures_end_the_job_with_their_own_codes(store, redis_url, server, tmp_path):
    settings = settings_for(redis_url, remote_endpoints=[server.url])
    runtime = ModelRuntime(store, settings)
    # Not in the worker's allow-list: the bundle cannot be used (the API refuses its upload too).
    closed = settings_for(redis_url)
    digest = register_remote(store, server.url)
    job = new_job(store, digest, constant(0.6), sigma=0.25)
    assert run_job(store, ModelRuntime(store, closed), job, closed) == "failed"
    assert store.get_job(job).error["code"] == "bad_model"
    assert "SMOOTHCERT_REMOTE_ENDPOINTS" in store.get_job(job).error["message"]
    # An answer that cannot be counted.
    job = new_job(store, register_remote(store, server.url, "nan"), constant(0.6), sigma=0.25)
    assert run_job(store, runtime, job, settings) == "failed" and store.get_job(job).error["code"] == "remote_error"
    # The model is replaced while the job samples.
    server.flag.unlink(missing_ok=True)
    flip = register_remote(store, server.url, "tiny-flip", canary_every=2)
    job = new_job(store, flip, constant(0.6), sigma=0.25, n=20_000, batch_size=250)
    from workers import jobs as worker_jobs

    real = worker_jobs.ProgressWriter.__call__

    def replace_then_write(self, stage, done, total):
        if stage == "estimation" and done >= 1000:
            server.flag.touch()
        return real(self, stage, done, total)

    worker_jobs.ProgressWriter.__call__ = replace_then_write
    try:
        assert run_job(store, runtime, job, settings) == "failed"
    finally:
        worker_jobs.ProgressWriter.__call__ = real
        server.flag.unlink(missing_ok=True)
    assert store.get_job(job).error["code"] == "remote_changed"
    # The server is gone.
    gone = RemoteServer(tmp_path, free_port())
    gone.start()
    settings = settings_for(redis_url, remote_endpoints=[gone.url])
    digest = register_remote(store, gone.url, retries=1, timeout_seconds=2)
    gone.stop()
    job = new_job(store, digest, constant(0.6), sigma=0.25)
    assert run_job(store, ModelRuntime(store, settings), job, settings) == "failed"
    assert store.get_job(job).error["code"] == "remote_unavailable"
