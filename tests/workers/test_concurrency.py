"""Several worker processes certify with the shared memory at once (docs/memory.md): inputs
close together on both sides of the decision boundary, so that balls conflict and commits
race. Afterwards the committed log keeps the invariant, every job committed exactly one
entry (none when the memory answered it), and every job's certificate is its entry."""

from __future__ import annotations

import multiprocessing
from collections import Counter

import numpy as np
import torch

from smoothcert.memory import ABSTAIN, invariant_violations
from tests.workers.helpers import LAX_MEMORY, SHAPE, namespace, new_job, run_jobs_in_process
from workers.shared_memory import decode_entry

PROCESSES = 2
INPUTS = 48
REPEATS = 8


def inputs(seed: int = 0) -> list[np.ndarray]:
    """Points within ~0.3 of each other, alternating sides of the boundary (mean 0.5)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(INPUTS):
        side = 1 if k % 2 else -1
        x = 0.5 + side * rng.uniform(0.0, 0.02) + rng.normal(0, 0.025, SHAPE)
        out.append(np.clip(x, 0, 1).astype(np.float32))
    return out + out[:REPEATS]  # repeated last: inside their first ball unless it abstained


def test_parallel_workers_keep_the_memory_consistent(store, digest, redis_url):
    # Large α and small n: radii often overshoot the true distance, so the rule must act.
    sigmas = (0.12, 0.25, 0.5)
    jobs = [new_job(store, digest, x, memory=True, sigma=sigmas[k % 3], n0=20, n=50,
                    alpha=0.3, batch_size=100, seed=k)
            for k, x in enumerate(inputs())]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    procs = [ctx.Process(target=run_jobs_in_process, args=(redis_url, jobs[i::PROCESSES], barrier, LAX_MEMORY))
             for i in range(PROCESSES)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()

    entries = [decode_entry(b) for b in store.memory_entries(namespace(digest, alpha=0.3))]
    points = torch.from_numpy(np.stack([e.values for e in entries]))
    classes = torch.tensor([e.prediction for e in entries])
    radii = torch.tensor([e.radius for e in entries], dtype=torch.float64)
    assert invariant_violations(points, classes, radii) == 0

    by_job = Counter(e.job_id for e in entries)
    answered = 0
    for job_id in jobs:
        job = store.get_job(job_id)
        assert job.status == "succeeded", job.error
        r, m = job.result, job.result["memory"]
        if m["entry"] is None:  # answered from the memory: no sampling, no commit
            answered += 1
            assert m["outcome"] == "inside" and r["samples"] == 0 and job_id not in by_job
            ball = entries[int(m["conflict"])]
            assert r["prediction"] == (None if ball.prediction == ABSTAIN else ball.prediction)
            continue
        assert by_job[job_id] == 1
        e = entries[int(m["entry"])]
        assert e.job_id == job_id
        expected = (None if e.prediction == ABSTAIN else e.prediction, e.radius, e.provenance.sigma, e.outcome,
                    e.radius_before)
        assert (r["prediction"], r["radius"], r["sigma"], m["outcome"], m["radius_before"]) == expected
    assert len(entries) == len(jobs) - answered and sum(by_job.values()) == len(entries)
    outcomes = Counter(e.outcome for e in entries)
    assert outcomes["shrunk"] + outcomes["inside"] > 0, outcomes  # the rule really acted
    assert answered > 0  # and the memory answered
    retries = {k: v for k, v in store.metrics()["counters"].items() if k.startswith("memory_commit_retries")}
    print(f"outcomes {dict(outcomes)}, answered from memory {answered}, commit retries {retries}")
