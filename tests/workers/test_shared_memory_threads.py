"""One SharedMemory shared by several threads of one process (Celery's thread pool), next to
another process's copy: inputs close together on both sides of the decision boundary, so
that balls conflict and commits race. Afterwards the log keeps the invariant, every job has
at most one entry (exactly one unless the memory answered it), every certificate is its
entry, and each local copy is exactly the log. Without the lock, threads extend the copy
twice and the commit loop never again matches the log's length: hence the time limits."""

from __future__ import annotations

import math
import threading
from collections import Counter

import numpy as np
import pytest
import torch

from smoothcert.bundle import load_bundle
from smoothcert.certifier import Certifier
from smoothcert.memory import ABSTAIN, invariant_violations, point_values
from smoothcert.results import Certificate
from tests.workers.helpers import SHAPE
from workers.shared_memory import JobMemory, SharedMemory, certify_with_memory, decode_entry

DIM = math.prod(SHAPE)
THREADS = 4


def run_threads(target, jobs: list, threads: int = THREADS) -> list:
    """Runs target(job) for every job on `threads` threads that start together; re-raises."""
    errors, barrier = [], threading.Barrier(threads)

    def worker(mine):
        barrier.wait(30)
        try:
            for job in mine:
                target(job)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(jobs[i::threads],)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(300)
    assert not any(t.is_alive() for t in pool)
    if errors:
        raise errors[0]
    return errors


def check_log(store, ns: str, results: dict[str, Certificate], copies: list[SharedMemory]) -> Counter:
    entries = [decode_entry(b) for b in store.memory_entries(ns)]
    points = torch.from_numpy(np.stack([e.values for e in entries]))
    classes = torch.tensor([e.prediction for e in entries])
    radii = torch.tensor([e.radius for e in entries], dtype=torch.float64)
    assert invariant_violations(points, classes, radii) == 0
    by_job = Counter(e.job_id for e in entries)
    assert max(by_job.values()) == 1
    for job_id, got in results.items():
        if got.memory.entry is None:  # answered from the memory: no entry of its own
            assert got.memory.outcome == "inside" and job_id not in by_job
            ball = entries[got.memory.conflict]
            assert got.prediction == (None if ball.prediction == ABSTAIN else ball.prediction)
            continue
        e = entries[got.memory.entry]
        assert e.job_id == job_id
        assert (got.prediction, got.radius, got.sigma, got.memory.outcome) == \
            (None if e.prediction == ABSTAIN else e.prediction, e.radius, e.provenance.sigma, e.outcome)
    for copy in copies:  # each local copy is the log, entry for entry
        copy.sync()
        assert torch.equal(point_values(copy.local.points), points)
        assert torch.equal(copy.local.radii, radii) and torch.equal(copy.local.classes, classes)
    return Counter(e.outcome for e in entries)


@pytest.mark.timeout(120)
def test_threads_certify_and_commit_through_one_shared_memory(store, bundle):
    certifier = Certifier(load_bundle(bundle[2]), device="cpu")
    ns = certifier.memory_namespace(0.3)
    mine, other = (SharedMemory(store, ns, DIM, capacity=1000) for _ in range(2))
    rng = np.random.default_rng(0)
    inputs = []
    for k in range(40):  # within ~0.3 of each other, alternating sides of the boundary
        x = 0.5 + (1 if k % 2 else -1) * rng.uniform(0.0, 0.02) + rng.normal(0, 0.025, SHAPE)
        inputs.append(np.clip(x, 0, 1).astype(np.float32))
    inputs += inputs[:6]  # repeated: inside their first ball unless it abstained
    results: dict[str, Certificate] = {}

    def job(k: int) -> None:
        memory = mine if k % 5 else other  # most jobs share `mine`; `other` races them
        results[f"job-{k}"] = certify_with_memory(
            certifier, memory, inputs[k], f"job-{k}", sigma=(0.12, 0.25, 0.5)[k % 3], n0=20, n=50,
            alpha=0.3, batch_size=100, seed=k)

    run_threads(job, list(range(len(inputs))))
    outcomes = check_log(store, ns, results, [mine, other])
    assert outcomes["shrunk"] + outcomes["inside"] > 0, outcomes  # the rule really acted


@pytest.mark.timeout(120)
def test_many_threads_commit_conflicting_balls_through_one_shared_memory(store):
    ns = "sha256:threads/fp32/cpu/0.001"
    mine, other = (SharedMemory(store, ns, DIM, capacity=10_000) for _ in range(2))
    g = torch.Generator().manual_seed(1)
    points = torch.rand(160, DIM, generator=g) * 0.6
    points[120:] = points[:40] + 0.01  # near earlier inputs: inside their balls, unless they abstained
    points = points.reshape(160, *SHAPE)
    results: dict[str, Certificate] = {}

    def job(k: int) -> None:
        memory, job_id = (mine if k % 4 else other), f"job-{k}"
        template = Certificate(prediction=None, radius=0.0, sigma=0.25, bound="cohen", n0=10, n=100,
                               alpha=0.001, batch_size=100, seed=k)
        jm = JobMemory(memory, job_id)
        answered = jm.answer(points[k], template)
        if answered is not None:
            results[job_id] = answered
            return
        prediction = None if k % 7 == 0 else k % 3
        fresh = template.replace(prediction=prediction, radius=0.0 if prediction is None else 0.2 + (k % 5) * 0.1,
                                 n_a=90, p_a_lower=0.9)
        got = results[job_id] = jm.certify(points[k], fresh)
        again = jm.answer(points[k], template)  # a redelivery gets the same entry
        assert (again.prediction, again.radius, again.sigma, again.memory) == \
            (got.prediction, got.radius, got.sigma, got.memory)

    run_threads(job, list(range(len(points))), threads=8)
    outcomes = check_log(store, ns, results, [mine, other])
    answered = sum(r.memory.entry is None for r in results.values())
    assert outcomes["shrunk"] > 0 and answered > 0, (outcomes, answered)
