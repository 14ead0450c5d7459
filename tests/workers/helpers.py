"""Shared helpers of the worker tests: an exact tiny bundle, jobs made through the store,
and a worker-process entry point for multiprocessing ('spawn' imports it by name)."""

from __future__ import annotations

import io
import os
import pathlib
import time

import numpy as np
import torch

from service.config import Settings
from service.store import Store
from smoothcert.architectures import build_architecture
from smoothcert.bundle import ModelSpec, SigmaRange, save_bundle, zip_bundle
from smoothcert.results import DEFAULT_NUMERIC_MODE as NUMERIC_MODE
from smoothcert.results import memory_namespace

SHAPE = (1, 4, 4)
LABELS = ("low", "high")
SCALE = 40.0  # logit gap per unit of mean pixel: sharp, still exact (a half-space)


def make_bundle(directory: pathlib.Path) -> tuple[str, dict, bytes]:
    """A linear bundle: class 1 iff mean pixel > 0.5. Returns (digest, model.json, zip).

    Its smoothed classifier is exact (docs/algorithms.md §8): the robust radius of x is the
    distance to the hyperplane, 4·|mean(x) − 0.5|."""
    spec = ModelSpec(name="tiny", input_shape=SHAPE, num_classes=2, labels=LABELS,
                     sigma=SigmaRange(0.25, 0.05, 1.0), architecture="linear")
    net = build_architecture("linear", SHAPE, 2)
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.bias.zero_()
        net.fc.weight[1].fill_(SCALE / 16)
        net.fc.bias[1] = -SCALE * 0.5
    digest = save_bundle(directory, spec, net, fmt="state_dict")
    return digest, spec.to_json(), zip_bundle(directory)


def distance_to_boundary(x: np.ndarray) -> float:
    return 4 * abs(float(np.mean(x)) - 0.5)


def settings_for(redis_url: str, **overrides) -> Settings:
    return Settings(redis_url=redis_url, device="cpu", **overrides)


def store_for(settings: Settings) -> Store:
    return Store.from_url(settings.redis_url, prefix=settings.key_prefix,
                          job_ttl_seconds=settings.job_ttl_seconds)


def namespace(digest: str, numeric_mode: str = NUMERIC_MODE, alpha: float = 0.001) -> str:
    """The memory a CPU worker keeps for this model, numeric mode and α."""
    return memory_namespace(digest, numeric_mode, "cpu", alpha)


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(x, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def constant(value: float) -> np.ndarray:
    return np.full(SHAPE, value, dtype=np.float32)


def new_job(store: Store, digest: str, x: np.ndarray, kind: str = "certification",
            model: str = "tiny", **request) -> str:
    """A queued job as the API would store it (every request key filled in)."""
    base = {"sigma": None, "sigma_search": None, "bound": None, "n0": 50, "n": 1000,
            "alpha": 0.001, "batch_size": 500, "memory": False, "seed": 7}
    if kind == "prediction":
        base = {"sigma": None, "n": 1000, "alpha": 0.001, "batch_size": 500, "seed": 7}
    job, _ = store.create_job(kind, model=model, digest=digest, request=base | request,
                              input_bytes=npy(x))
    return job.id


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# A memory of weak certificates (large α, small n) for the tests that need the rule to act
# often: radii overshoot, balls conflict. Never a service default.
LAX_MEMORY = {"max_alpha": 0.3, "memory_alphas": [0.3], "memory_min_n": 50}


def run_jobs_in_process(redis_url: str, job_ids: list[str], barrier, overrides: dict | None = None) -> None:
    """A worker process of the concurrency test: its own Store, runtime and memory copy."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from workers.jobs import run_job
    from workers.runtime import ModelRuntime

    settings = settings_for(redis_url, **(overrides or {}))
    store = store_for(settings)
    runtime = ModelRuntime(store, settings)
    barrier.wait(timeout=60)  # start together, so commits really race
    for job_id in job_ids:
        run_job(store, runtime, job_id, settings)
