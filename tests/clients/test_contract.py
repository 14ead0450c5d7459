"""The SDK against the real app in process (as polar's SDK tests do): real routes, the
real store on the test Redis, and jobs run by the workers' own `run_job`, so the SDK parses
exactly what a worker writes and the API serves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from clients import CertifyOptions, Client, NotFoundError, PermissionDeniedError, UnprocessableEntityError
from service.config import Settings
from service.main import create_app
from service.store import Store
from service.up import DEMO_BUNDLE, register_bundle
from workers.jobs import run_job
from workers.runtime import ModelRuntime

from .fake_server import sync_transport

ROOT = Path(__file__).resolve().parents[2]
USER, ADMIN = "contract-user", "contract-admin"


@pytest.fixture()
def world(redis_url, redis_client):
    settings = Settings(redis_url=redis_url, api_keys=[USER], admin_keys=[ADMIN], device="cpu")
    store = Store(redis_client, prefix=settings.key_prefix, job_ttl_seconds=settings.job_ttl_seconds)
    register_bundle(store, DEMO_BUNDLE)
    transport = sync_transport(create_app(settings, store))

    def client(key: str = USER) -> Client:
        return Client("http://testserver", api_key=key, transport=transport)

    def work(job_id: str) -> str | None:  # what a worker would do with the queued task
        return run_job(store, ModelRuntime(store, settings), job_id, settings)

    return client, work, store


def test_certify_round_trip(world):
    client, work, store = world
    with client() as c:
        job = c.certify(ROOT / "examples" / "digit-7.png", model="digits", sigma=0.25, n=1000, seed=5)
        assert c.job(job.id).status().status == "queued"
        assert work(job.id) == "succeeded"
        status = job.status()
    r = status.result
    assert status.done and r.prediction == 7 and r.label == "7" and not r.abstained
    assert r.radius > 0 and r.sigma == 0.25 and r.bound == "cohen" and (r.n0, r.n, r.alpha) == (100, 1000, 0.001)
    assert r.model.name == "digits" and r.model.digest == store.get_model("digits").digest
    assert r.memory is not None and not r.memory.used
    assert (r.seed, r.seed_source) == (5, "caller") and r.extra["numeric_mode"] == "fp32"
    assert r.guarantee["scope"] == "smoothed" and "chosen by the caller" in r.guarantee["statement"]


def test_adaptive_sampling_round_trip(world):
    client, work, _ = world
    with client() as c:
        job = c.certify(ROOT / "examples" / "digit-7.png", model="digits", sigma=0.25, n=20_000, seed=5,
                        sampling="adaptive", tolerance=0.1)
        assert work(job.id) == "succeeded"
        r = job.status().result
        with pytest.raises(UnprocessableEntityError, match="tolerance"):
            c.certify(ROOT / "examples" / "digit-7.png", model="digits", tolerance=0.1)
        with pytest.raises(UnprocessableEntityError, match="sampling"):
            c.certify(ROOT / "examples" / "digit-7.png", model="digits", sampling="sometimes")
    assert r.prediction == 7 and r.radius > 0
    assert (r.sampling, r.n_max, r.tolerance) == ("adaptive", 20_000, 0.1)
    assert 0 < r.n < r.n_max and r.extra["samples"] == 100 + r.n
    assert (r.target_radius, r.look_alpha) == (None, None)


def test_sequential_sampling_round_trip(world):
    client, work, _ = world
    digit = ROOT / "examples" / "digit-7.png"
    with client() as c:
        job = c.certify(digit, model="digits", sigma=0.25, n=10_000, seed=5, sampling="sequential", target_radius=0.25)
        assert work(job.id) == "succeeded"
        r = job.status().result
        with pytest.raises(UnprocessableEntityError, match="needs target_radius"):
            c.certify(digit, model="digits", sampling="sequential")
        with pytest.raises(UnprocessableEntityError, match="target_radius applies"):
            c.certify(digit, model="digits", target_radius=0.25)
    assert r.prediction == 7 and r.radius >= 0.25
    assert (r.sampling, r.n_max, r.target_radius, r.tolerance) == ("sequential", 10_000, 0.25, None)
    assert 0 < r.n < r.n_max and r.extra["samples"] >= 100 + r.n
    assert 0 < r.look_alpha < r.alpha


def test_search_with_memory_and_the_memory_endpoint(world):
    client, work, _ = world
    with client() as c:
        job = c.certify(ROOT / "examples" / "digit-2.png", model="digits", sigma_search={"method": "insta", "steps": 1},
                        n=1000)
        assert job.status().raw["request"]["seed"] is None  # drawn by the service, hidden until the end
        work(job.id)
        status = job.status()
        r = status.result
        memory = c.model_memory("digits")
    assert r.memory.used and r.memory.outcome == "new" and r.extra["search"]["method"] == "insta"
    assert r.seed_source == "server" and r.seed == status.raw["request"]["seed"] is not None
    assert r.memory.root == r.memory.entry == "0" and r.memory.root_job == job.id
    assert r.guarantee["scope"] == "memory"
    assert memory.entries == 1 and memory.your_commits == 1 and len(memory.namespaces) == 1


def test_predictions_and_metrics(world):
    client, work, _ = world
    with client() as c:
        answered = c.predict(ROOT / "examples" / "digit-0.png", model="digits", n=200, seed=0)
        noise = [[[0.5 if (i + j) % 2 else 0.45 for j in range(8)] for i in range(8)]]
        unsure = c.predict(noise, model="digits", n=11, sigma=1.0, seed=0)  # 11 votes rarely agree
        for job in (answered, unsure):
            work(job.id)
        first, second = answered.status().result, unsure.status().result
        text = c._http.get("/metrics").text  # noqa: SLF001 - the SDK has no metrics call
    assert first.prediction == 0 and not first.abstained
    assert second.abstained and second.prediction is None
    ratio = float(re.search(r'abstention_ratio\{kind="prediction"\} ([0-9.]+)', text).group(1))
    assert ratio == pytest.approx(0.5)


def test_errors_map_to_the_sdk_tree(world):
    client, _, _ = world
    with client() as c:
        with pytest.raises(UnprocessableEntityError, match="n ≥ 10"):
            c.certify(ROOT / "examples" / "digit-1.png", model="digits", n0=5, n=5)
        with pytest.raises(NotFoundError):
            c.certify(ROOT / "examples" / "digit-1.png", model="nope")
        with pytest.raises(PermissionDeniedError):
            c.upload_model(DEMO_BUNDLE)
    with client(ADMIN) as admin:
        assert admin.upload_model(DEMO_BUNDLE).name == "digits"
        assert [m.name for m in admin.models()] == ["digits"]


def test_delete_model(world):
    client, work, store = world
    digest = store.get_model("digits").digest
    with client() as c:
        with pytest.raises(PermissionDeniedError):
            c.delete_model("digits")
        queued = c.certify(ROOT / "examples" / "digit-3.png", model="digits", n=200)
    with client(ADMIN) as admin:
        deleted = admin.delete_model("digits")
        assert (deleted.name, deleted.digest) == ("digits", digest)
        assert admin.models() == []
        with pytest.raises(NotFoundError):
            admin.delete_model("digits")
    assert work(queued.id) == "failed"  # its bundle is gone
    with client() as c:
        status = c.job(queued.id).status()
    assert status.status == "failed" and status.error.code == "bad_model"


def test_a_repeated_submission_returns_the_first_job(world):
    """What makes retrying a submission safe: the SDK sends the same made-up Idempotency-Key
    on every attempt, and the API answers a repeat (here: the same request sent twice, as
    after a lost answer) with the first job, even though it drew that job's seed itself."""
    client, _, store = world
    with client() as c:
        op = c._submit_op("certification", ROOT / "examples" / "digit-4.png", "digits", {"n": 200}, CertifyOptions)
        first, again = c._run(op), c._run(op)
        other = c.certify(ROOT / "examples" / "digit-4.png", model="digits", n=200)
    assert op.retry and op.request["headers"]["Idempotency-Key"]
    assert first.id == again.id != other.id
    assert len(list(store.r.scan_iter(f"{store.p}:job:*"))) == 2


def test_cancel_twice_answers_the_status(world):
    """Cancelling is idempotent on the API (a retried cancel after a lost answer is harmless)."""
    client, _, _ = world
    with client() as c:
        job = c.certify(ROOT / "examples" / "digit-5.png", model="digits", n=200)
        op = c._cancel_op("certification", job.id)
        assert op.retry and c._run(op).status == "cancelled" and c._run(op).status == "cancelled"
