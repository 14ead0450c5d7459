"""Jobs as threads of one worker process (`--pool threads`): cross-batched jobs keep their
own counts, numeric modes reach the certificate and the memory namespace, and the job time
limit works without Celery's (prefork-only) limits."""

from __future__ import annotations

import threading

import numpy as np

from tests.workers.helpers import constant, namespace, new_job, settings_for
from workers.jobs import run_job
from workers.runtime import ModelRuntime

VALUES = (0.2, 0.45, 0.5, 0.55, 0.8, 0.62)


def run_in_threads(store, runtime, settings, job_ids):
    threads = [threading.Thread(target=run_job, args=(store, runtime, j, settings)) for j in job_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return [store.get_job(j) for j in job_ids]


def test_cross_batched_jobs_equal_the_same_jobs_run_alone(store, settings, digest):
    alone_runtime = ModelRuntime(store, settings_for(settings.redis_url, cross_batching=False))
    merged_runtime = ModelRuntime(store, settings_for(settings.redis_url, cross_batching=True))
    assert merged_runtime.scheduler is not None and alone_runtime.scheduler is None
    requests = [dict(n=3000, batch_size=200, seed=40 + i) for i in range(len(VALUES))]
    alone = []
    for value, request in zip(VALUES, requests, strict=True):
        job_id = new_job(store, digest, constant(value), **request)
        run_job(store, alone_runtime, job_id, settings)
        alone.append(store.get_job(job_id))
    merged = run_in_threads(store, merged_runtime, settings,
                            [new_job(store, digest, constant(v), **r) for v, r in zip(VALUES, requests, strict=True)])
    for a, m in zip(alone, merged, strict=True):
        assert a.status == m.status == "succeeded"
        keys = ("prediction", "radius", "p_a_lower", "samples", "batch_size")
        assert [a.result[k] for k in keys] == [m.result[k] for k in keys]
    assert merged_runtime.scheduler.requests >= len(VALUES) * 16  # every pass went through it


def test_numeric_mode_reaches_the_certificate_and_the_memory_namespace(store, runtime, settings, digest):
    job_id = new_job(store, digest, constant(0.8), numeric_mode="bf16", memory=True)
    assert run_job(store, runtime, job_id, settings) == "succeeded"
    assert store.get_job(job_id).result["numeric_mode"] == "bf16"
    assert store.memory_size(namespace(digest, "bf16"))[0] == 1 and store.memory_size(namespace(digest))[0] == 0


def test_a_cuda_only_mode_on_a_cpu_worker_is_an_invalid_request(store, runtime, settings, digest):
    assert settings.device == "cpu"
    job_id = new_job(store, digest, constant(0.8), numeric_mode="fp16")
    assert run_job(store, runtime, job_id, settings) == "failed"
    error = store.get_job(job_id).error
    assert error["code"] == "invalid_request" and "needs a CUDA device" in error["message"]


def test_the_job_time_limit_holds_in_any_pool(store, runtime, digest, settings):
    limited = settings_for(settings.redis_url, job_time_limit_seconds=1)
    slow = new_job(store, digest, constant(0.8), n=50_000_000 // 50, batch_size=1, seed=1)
    assert run_job(store, runtime, slow, limited) == "failed"
    assert store.get_job(slow).error == {"code": "time_limit", "message": "the job ran longer than 1 s"}
    fast = new_job(store, digest, constant(0.8))  # the worker is free again
    assert run_job(store, runtime, fast, settings) == "succeeded"
    assert np.isfinite(store.get_job(fast).result["radius"])


def test_cross_batching_is_on_for_cuda_workers_only_by_default(store, settings):
    assert ModelRuntime(store, settings).scheduler is None  # a CPU worker
    assert ModelRuntime(store, settings_for(settings.redis_url, cross_batching=True)).scheduler is not None
