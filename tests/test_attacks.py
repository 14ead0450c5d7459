"""Adversarial callers against the real stack (redis-server, a Celery worker, uvicorn) with
several API keys and the exact linear model uploaded through the API (class 1 iff the mean
pixel > 1/2; the exact robust radius of x is 4·|mean(x) − 1/2|: docs/algorithms.md §8).

Each attack ends refused (a 4xx, or a job failed with a clear code) or answered soundly: the
answers claim a radius above the exact one no more often than their α allows (a one-sided
binomial test at 1e-3). Where a test rests on that check, it also runs the check on what an
unsound service would have answered (computed here in-process from the same model and
points), with the check's power against it computed first (tests/smoothcert/exact.py).
docs/guarantees.md says what each refusal protects.
"""

from __future__ import annotations

import json
import time
import warnings
import zipfile
from io import BytesIO

import numpy as np
import pytest
from scipy.stats import binom, norm

from benchmarks.stack import Stack
from clients import Client, UnprocessableEntityError
from service.store import Store
from service.up import worker_command
from smoothcert import bounds
from smoothcert.bundle import load_bundle
from smoothcert.certifier import Certifier
from tests.smoothcert.exact import assert_rate_at_most, power, rate_is_too_high
from tests.workers.helpers import SHAPE, make_bundle

ADMIN, ATTACKER, VICTIM, PLANTER = "attack-admin", "attack-attacker", "attack-victim", "attack-planter"
OBSERVER, BYSTANDER = "attack-observer", "attack-bystander"
QUOTA = 45  # commits per key and model: above what any one test's honest caller commits
SIGMA = 0.25


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The stack with default memory rules (levels 0.001, 0.01, 0.05; n ≥ 1000; α ≤ 0.05),
    a small commit quota per key, and "tiny" uploaded by the admin key."""
    logs = tmp_path_factory.mktemp("attack-logs")
    env = {"SMOOTHCERT_ADMIN_KEYS": ADMIN,
           "SMOOTHCERT_API_KEYS": ",".join([ATTACKER, VICTIM, PLANTER, OBSERVER, BYSTANDER]),
           "SMOOTHCERT_MEMORY_QUOTA_PER_KEY": str(QUOTA)}
    digest, _, data = make_bundle(tmp_path_factory.mktemp("tiny"))
    with Stack(logs, device="cpu", env=env) as s:
        s.worker("worker", worker_command("attack@%h"), OMP_NUM_THREADS="1")
        url = s.api(workers=1)
        with Client(url, api_key=ADMIN, timeout=60) as admin:
            assert admin.upload_model(data).digest == digest
        yield url, s, data


def point(mean_offset: float, seed: int) -> np.ndarray:
    """An input of "tiny" whose mean pixel is 1/2 + mean_offset (exact radius 4·|offset|)."""
    wiggle = np.random.default_rng(seed).uniform(-0.2, 0.2, SHAPE)
    return (0.5 + mean_offset + wiggle - wiggle.mean()).astype(np.float32)


def exact(x: np.ndarray) -> tuple[int, float]:
    mean = float(np.mean(np.asarray(x, dtype=np.float64)))
    return int(mean > 0.5), 4 * abs(mean - 0.5)


def run_all(client: Client, inputs, **options) -> list:
    """Submit every certification, then wait for each; the final statuses, in order."""
    jobs = [client.certify(x.tolist(), model="tiny", **options) for x in inputs]
    return [job.wait(timeout=180) for job in jobs]


def violates(result, x) -> bool:
    truth, radius = exact(x)
    return not result.abstained and (result.prediction != truth or result.radius > radius)


def strict_json(status) -> None:
    """The body is JSON as RFC 8259 has it: no Infinity, no NaN."""
    def refuse(name):
        raise AssertionError(f"non-JSON constant {name} in a response")
    json.loads(json.dumps(status.raw), parse_constant=refuse)


def test_mixed_alpha_a_lax_memory_never_answers_a_strict_request(stack):
    url, _, data = stack
    sides = [1 if k % 2 else -1 for k in range(40)]
    lax_points = [point(side * 0.3 / 4, seed=k) for k, side in enumerate(sides)]
    # The victim's points: 0.001 closer to the boundary, inside the attacker's balls.
    strict_points = [(x - side * 0.001 / 4).astype(np.float32) for x, side in zip(lax_points, sides, strict=True)]
    with Client(url, api_key=ATTACKER) as attacker, Client(url, api_key=VICTIM) as victim:
        for alpha, why in ((0.9, "SMOOTHCERT_MAX_ALPHA"), (1 - 1e-12, "SMOOTHCERT_MAX_ALPHA"),
                           (0.02, "SMOOTHCERT_MEMORY_ALPHAS")):
            with pytest.raises(UnprocessableEntityError, match=why):
                attacker.certify(lax_points[0].tolist(), model="tiny", alpha=alpha, n0=10, n=1000, memory=True)
        with pytest.raises(UnprocessableEntityError, match="SMOOTHCERT_MEMORY_MIN_N"):
            attacker.certify(lax_points[0].tolist(), model="tiny", alpha=0.05, n0=10, n=10, memory=True)
        lax = run_all(attacker, lax_points, alpha=0.05, n0=10, n=1000, memory=True)
        strict = run_all(victim, strict_points, alpha=0.001, n0=100, n=10_000, memory=True)
    lax_jobs = {s.id for s in lax}
    for status in lax + strict:
        assert status.status == "succeeded", status.raw["error"]
        strict_json(status)
    assert all(s.result.memory.namespace.endswith("/0.05") for s in lax)
    for s in strict:  # never an answer of the lax memory, and never labelled with another level
        r = s.result
        assert r.memory.namespace.endswith("/0.001") and r.alpha == 0.001 and r.memory.root_job not in lax_jobs
    violations = sum(violates(s.result, x) for s, x in zip(strict, strict_points, strict=True))
    assert_rate_at_most(violations, len(strict), 0.001, "strict answers next to a lax memory")

    # The unsound variant: the service before levels had one memory for every α, so the
    # victim was answered from the attacker's balls, R − 0.001, labelled α = 0.001. The
    # attacker of that service used α = 0.9, n0 = n = 10 (refused now): its certificates,
    # made here by the engine on the same model and points, over-claim at a rate computed
    # exactly (all 10 votes or 9 of them give pA_low above the true pA = Φ(1.2)).
    p_true = float(norm.cdf(0.3 / SIGMA))
    needed = next(k for k in range(11) if bounds.cp_lower(k, 10, 0.9) > p_true)
    rate = float(binom.sf(needed - 1, 10, p_true))
    assert power(rate, len(strict_points), 0.001) > 0.99, rate
    certifier = Certifier(load_bundle(data), device="cpu")
    old = [certifier.certify(x, sigma=SIGMA, n0=10, n=10, alpha=0.9, seed=k) for k, x in enumerate(lax_points)]
    inherited = sum(
        not c.abstained and (c.prediction != exact(y)[0] or c.radius - 0.001 > exact(y)[1])
        for c, y in zip(old, strict_points, strict=True))
    assert rate_is_too_high(inherited, len(strict_points), 0.001), inherited


def test_seed_shopping_is_refused_with_the_memory_and_labelled_without(stack):
    url, _, _ = stack
    x = point(0.3 / 4, seed=100)
    with Client(url, api_key=ATTACKER) as attacker:
        # With the memory off a caller's seed is allowed, to reproduce a run; shopping for the
        # seed with the largest radius then makes a certificate that guarantees nothing.
        jobs = [attacker.certify(x.tolist(), model="tiny", alpha=0.05, n0=10, n=1000, seed=s) for s in range(12)]
        shopped = [job.wait(timeout=120) for job in jobs]
        best = max(shopped, key=lambda s: s.result.radius)
        for s in shopped:
            assert s.result.seed_source == "caller" and "guarantees nothing" in s.result.guarantee["statement"]
        with pytest.raises(UnprocessableEntityError, match="seed: with the memory on the service draws the seed"):
            attacker.certify(x.tolist(), model="tiny", alpha=0.05, n0=10, n=1000, memory=True,
                             seed=best.result.seed)
        drawn = attacker.certify(x.tolist(), model="tiny", alpha=0.05, n0=10, n=1000, memory=True).wait(timeout=120)
    assert drawn.status == "succeeded" and drawn.result.seed_source == "server"
    assert drawn.result.seed not in {s.result.seed for s in shopped}


def test_a_drawn_seed_stays_hidden_until_the_job_has_succeeded(stack):
    url, s, _ = stack
    x = point(0.3 / 4, seed=200)
    store = Store.from_url(s.redis_url)
    with Client(url, api_key=OBSERVER) as victim:
        slow = victim.certify(x.tolist(), model="tiny", n=1_000_000, batch_size=1000, memory=True)
        deadline = time.monotonic() + 60
        while (status := slow.status()).status == "queued" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status.status == "running" and status.raw["request"]["seed"] is None and status.result is None
        # What the hiding protects: the stored request holds the seed all along.
        assert isinstance(store.get_job(slow.id).request["seed"], int)
        slow.cancel()
        assert slow.wait(timeout=60).raw["request"]["seed"] is None  # cancelled: never shown
        done = victim.certify(x.tolist(), model="tiny", n=1000, memory=True).wait(timeout=120)
    assert done.status == "succeeded" and done.raw["request"]["seed"] == done.result.seed is not None


def test_planted_abstentions_cost_samples_stop_at_the_quota_and_leave_answers_sound(stack):
    """An abstention is committed with radius 0 and shrinks every later ball of another class
    that contains it. With a large σ a caller can make one almost anywhere: here next to each
    of the bystander's inputs. Each costs at least n0 + SMOOTHCERT_MEMORY_MIN_N samples, a key
    plants at most its quota, and the shrunk answers stay sound."""
    url, _, _ = stack
    with Client(url, api_key=ADMIN) as admin:  # earlier tests' balls (up to ~1 wide) could hold a plant
        assert admin.reset_model_memory("tiny").size == 0
    sides = [1 if k % 2 else -1 for k in range(QUOTA + 1)]
    targets = [point(side * 0.1 / 4, 300 + k) for k, side in enumerate(sides)]
    plants = [(x - side * 0.001 / 4).astype(np.float32) for x, side in zip(targets, sides, strict=True)]
    with Client(url, api_key=PLANTER) as planter, Client(url, api_key=BYSTANDER) as bystander:
        with pytest.raises(UnprocessableEntityError, match="SMOOTHCERT_MEMORY_MIN_N"):
            planter.certify(plants[0].tolist(), model="tiny", sigma=1.0, n0=10, n=11, memory=True)
        planted = run_all(planter, plants, sigma=1.0, n0=10, n=1000, memory=True)
        # n0 = 1,000: at the exact pA = Φ(0.4) ≈ 0.655, n0 = 100 picks the wrong class (and the
        # answer abstains, which no plant can shrink) with probability ≈ 4·10⁻⁴ an answer.
        answers = run_all(bystander, targets, sigma=SIGMA, n0=1000, n=10_000, memory=True)
        memory = planter.model_memory("tiny")
    committed, refused = planted[:QUOTA], planted[QUOTA]
    for p in committed:  # each its own entry (an abstention or a tiny ball: none holds another plant)
        assert p.status == "succeeded" and p.result.memory.entry is not None, (
            p.status, p.raw.get("error"), p.raw.get("result", {}).get("memory"))
    assert all(p.result.extra["samples"] >= 10 + 1000 for p in committed)
    assert refused.status == "failed" and refused.error.code == "memory_quota", refused.raw["error"]
    assert "SMOOTHCERT_MEMORY_QUOTA_PER_KEY" in refused.error.message and memory.your_commits == QUOTA
    for status in answers:
        assert status.status == "succeeded", status.raw["error"]  # the planter's quota is not the bystander's
        strict_json(status)
    # Every abstention planted 0.001 away cut the bystander's ball down to it; past the quota, none did.
    for plant, x, y, answer in zip(committed, plants, targets, answers, strict=False):
        if plant.result.abstained:
            gap = float(np.linalg.norm(x.astype(np.float64) - y.astype(np.float64)))  # ≈ 0.001
            assert answer.result.memory.outcome == "shrunk" and answer.result.radius <= gap, (
                answer.result.abstained, answer.result.radius, answer.result.memory, gap)
    assert answers[QUOTA].result.memory.outcome == "new" and answers[QUOTA].result.radius > 0.01
    assert sum(p.result.abstained for p in committed) >= QUOTA // 2
    assert_rate_at_most(sum(violates(s.result, x) for s, x in zip(answers, targets, strict=True)), len(answers),
                        0.001, "answers among planted abstentions")


def test_the_bundle_used_is_the_one_checked(stack):
    """A weights.pt naming one pickle twice (zipfile reads one copy, torch.load another) is
    refused at upload."""
    url, _, data = stack
    with zipfile.ZipFile(BytesIO(data)) as outer:
        files = {name: outer.read(name) for name in outer.namelist()}
    inner = BytesIO()
    with zipfile.ZipFile(BytesIO(files["weights.pt"])) as src, zipfile.ZipFile(inner, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        pickles = [i.filename for i in src.infolist() if i.filename.endswith(".pkl")]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dst.writestr(pickles[0], src.read(pickles[0]))
    files["weights.pt"] = inner.getvalue()
    bundle = BytesIO()
    with zipfile.ZipFile(bundle, "w") as out:
        for name, content in files.items():
            out.writestr(name, content)
    with Client(url, api_key=ADMIN) as admin, pytest.raises(UnprocessableEntityError, match="twice"):
        admin.upload_model(bundle.getvalue())
