"""POST/GET/DELETE /v1/certifications against a real Redis (store and Celery broker)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.config import Settings
from service.inputs import input_sha256
from service.main import create_app
from tests.conftest import free_port
from tests.service.conftest import (
    PREFIX,
    ROOT,
    SELECTOR,
    image,
    make_settings,
    npy_b64,
    npy_bytes,
    png_b64,
    register,
    stored_input,
)

X = image()


def submit(client, body=None, **kw):
    body = {"model": "digits", "input": {"tensor": X.tolist()}, "sigma": 0.25, "n": 1000} | (body or {})
    return client.post("/v1/certifications", json=body, **kw)


def broker_messages(redis_client, queue="certifications"):
    """The Celery messages waiting in a queue: (task name, args)."""
    out = []
    for raw in redis_client.lrange(queue, 0, -1):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        out.append((message["headers"]["task"], body[0]))
    return out


@pytest.mark.parametrize(("given", "exact"), [
    ({"tensor": X.tolist()}, True),
    ({"npy_b64": npy_b64(X)}, True),
    ({"image_b64": npy_b64(X)}, True),  # an .npy is sniffed whatever the field says
    ({"image_b64": png_b64(X)}, False),  # 8-bit pixels
    ({"image_b64": "data:image/png;base64," + png_b64(X)}, False),
])
def test_submit_json_stores_the_input_and_enqueues_by_name(client, store, redis_client, given, exact):
    r = submit(client, {"input": given})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.json() == {"id": job_id, "status": "queued"}
    assert r.headers["location"] == f"/v1/certifications/{job_id}"
    array = stored_input(store, job_id)
    assert array.dtype == np.float32 and array.shape == (1, 8, 8)
    assert np.array_equal(array, X) if exact else np.allclose(array, X, atol=0.5 / 255 + 1e-6)
    assert broker_messages(redis_client) == [("smoothcert.certify", [job_id])]


def test_submit_multipart(client, store, redis_client):
    r = client.post("/v1/certifications", files={"image": ("x.npy", npy_bytes(X))},
                    data={"model": "digits", "sigma_search": "insta", "n": "1000", "bound": "two_sided",
                          "memory": "false", "seed": "7"})
    assert r.status_code == 202, r.text
    job = store.get_job(r.json()["id"])
    assert job.request["sigma_search"]["method"] == "insta" and job.request["sigma"] is None
    assert job.request["memory"] is False and job.request["n"] == 1000
    assert (job.request["seed"], job.request["seed_source"]) == (7, "caller")
    assert job.request["bound"] == "two_sided"
    assert np.array_equal(stored_input(store, job.id), X)
    r = client.post("/v1/certifications", files={"image": ("x.png", base64.b64decode(png_b64(X)))},
                    data={"model": "digits", "sigma_search": '{"method": "ddrs", "steps": 5}'})
    assert r.status_code == 202, r.text
    assert store.get_job(r.json()["id"]).request["sigma_search"]["steps"] == 5
    assert len(broker_messages(redis_client)) == 2


def test_the_stored_request_resolves_every_default(client, store):
    r = client.post("/v1/certifications", json={"model": "digits", "input": {"tensor": X.tolist()}})
    request = store.get_job(r.json()["id"]).request
    seed = request.pop("seed")
    assert isinstance(seed, int) and 0 <= seed < 2**63
    assert request.pop("input_sha256") == sha256_of(X)
    assert request == {"sigma": 0.25, "sigma_search": None, "bound": "cohen", "n0": 100, "n": 100000,
                       "alpha": 0.001, "sampling": "fixed", "tolerance": None, "target_radius": None,
                       "batch_size": None, "numeric_mode": "fp32", "memory": False, "seed_source": "server"}
    r = submit(client, {"sigma": None, "sigma_search": {"method": "ddrs", "init": 0.5}})
    request = store.get_job(r.json()["id"]).request
    assert request["sigma_search"] == {"method": "ddrs", "steps": 100, "lr": 0.01, "samples": 64, "init": 0.5}
    assert request["memory"] is True and request["sigma"] is None


def test_adaptive_sampling_is_stored_with_its_tolerance(client, store):
    request = store.get_job(submit(client, {"sampling": "adaptive"}).json()["id"]).request
    assert (request["sampling"], request["tolerance"], request["n"]) == ("adaptive", 0.05, 1000)
    request = store.get_job(submit(client, {"sampling": "adaptive", "tolerance": 0.2}).json()["id"]).request
    assert request["tolerance"] == 0.2
    r = client.post("/v1/certifications", files={"image": ("x.npy", npy_bytes(X))},
                    data={"model": "digits", "sampling": "adaptive", "tolerance": "0"})
    assert r.status_code == 202, r.text
    assert store.get_job(r.json()["id"]).request["tolerance"] == 0.0


def test_sequential_sampling_is_stored_with_its_target_radius(client, store):
    request = store.get_job(submit(client, {"sampling": "sequential", "target_radius": 0.5}).json()["id"]).request
    assert (request["sampling"], request["target_radius"], request["tolerance"], request["n"]) == \
        ("sequential", 0.5, None, 1000)
    request = store.get_job(submit(client, {"sampling": "sequential", "target_radius": 1}).json()["id"]).request
    assert request["target_radius"] == 1.0 and isinstance(request["target_radius"], float)
    r = client.post("/v1/certifications", files={"image": ("x.npy", npy_bytes(X))},
                    data={"model": "digits", "sampling": "sequential", "target_radius": "0"})
    assert r.status_code == 202, r.text
    assert store.get_job(r.json()["id"]).request["target_radius"] == 0.0
    request = store.get_job(submit(client, {"sampling": "adaptive"}).json()["id"]).request
    assert request["target_radius"] is None


def sha256_of(array: np.ndarray) -> str:
    """What docs/api.md promises: the SHA-256 of the float32 array's bytes in C order."""
    return hashlib.sha256(np.ascontiguousarray(array, dtype="<f4").tobytes()).hexdigest()


def test_the_request_records_the_sha256_of_the_decoded_input(client, store):
    pixels = np.rint(X * 255) / np.float32(255)  # what the 8-bit PNG decodes to
    for given, decoded in (({"tensor": X.tolist()}, X), ({"npy_b64": npy_b64(X)}, X),
                           ({"image_b64": png_b64(X)}, pixels)):
        job_id = submit(client, {"input": given}).json()["id"]
        stored = store.get_input(job_id)
        assert np.array_equal(stored_input(store, job_id), decoded)
        assert input_sha256(stored) == sha256_of(decoded)
        assert store.get_job(job_id).request["input_sha256"] == sha256_of(decoded)
        assert client.get(f"/v1/certifications/{job_id}").json()["request"]["input_sha256"] == sha256_of(decoded)
    assert sha256_of(pixels) != sha256_of(X)  # the hash tells the decoded pixels apart
    r = client.post("/v1/certifications", files={"image": ("x.png", base64.b64decode(png_b64(X)))},
                    data={"model": "digits", "n": "1000"})
    assert store.get_job(r.json()["id"]).request["input_sha256"] == sha256_of(pixels)


def _png(image_: Image.Image, **save) -> str:
    out = io.BytesIO()
    image_.save(out, format="PNG", **save)
    return base64.b64encode(out.getvalue()).decode()


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


GREY = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
WIDE = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1031 + 7)
ACCEPTED = {
    "grey PNG": (_png(Image.fromarray(GREY)), GREY / np.float32(255)),
    "16-bit grey PNG, by 65535": (_png(Image.fromarray(WIDE)), WIDE.astype(np.float32) / np.float32(65535)),
    "opaque grey+alpha PNG, alpha dropped": (
        _png(Image.fromarray(np.dstack([GREY, np.full((8, 8), 255, np.uint8)]))), GREY / np.float32(255)),
    "EXIF-rotated PNG, turned first": (_png(Image.fromarray(GREY), exif=_exif(8)),
                                       np.rot90(GREY, k=1) / np.float32(255)),
}


@pytest.mark.parametrize("case", ACCEPTED, ids=list(ACCEPTED))
def test_accepted_images_are_stored_exactly(client, store, case):
    data, expected = ACCEPTED[case]
    r = submit(client, {"input": {"image_b64": data}})
    assert r.status_code == 202, r.text
    stored = stored_input(store, r.json()["id"])
    assert stored.shape == (1, 8, 8) and np.array_equal(stored[0], expected)


def test_a_sequential_certification_end_to_end(client, store, redis_url):
    # The real digits bundle (the registered one has dummy weights) and the workers' run_job.
    from service.up import DEMO_BUNDLE, register_bundle
    from workers.jobs import run_job
    from workers.runtime import ModelRuntime

    register_bundle(store, DEMO_BUNDLE)
    image_b64 = base64.b64encode((ROOT / "examples" / "digit-7.png").read_bytes()).decode()
    r = submit(client, {"input": {"image_b64": image_b64}, "n": 10_000, "seed": 3,
                        "sampling": "sequential", "target_radius": 0.25})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    settings = make_settings(redis_url, device="cpu")
    assert run_job(store, ModelRuntime(store, settings), job_id, settings) == "succeeded"
    body = client.get(f"/v1/certifications/{job_id}").json()
    result = body["result"]
    assert (result["sampling"], result["target_radius"], result["n_max"], result["tolerance"]) == \
        ("sequential", 0.25, 10_000, None)
    assert result["prediction"] == 7 and result["radius"] >= 0.25  # reached the target: stopped early
    assert 0 < result["n"] < result["n_max"] and result["samples"] >= result["n0"] + result["n"]
    assert 0 < result["look_alpha"] < result["alpha"]
    assert body["request"]["target_radius"] == 0.25


def test_status_progress_result(client, store):
    job_id = submit(client).json()["id"]
    body = client.get(f"/v1/certifications/{job_id}").json()
    assert (body["id"], body["status"], body["progress"], body["result"], body["error"]) == \
        (job_id, "queued", None, None, None)
    assert body["model"]["name"] == "digits" and body["request"]["n"] == 1000
    store.start_job(job_id)
    store.set_progress(job_id, "estimation", 500, 1000)
    body = client.get(f"/v1/certifications/{job_id}").json()
    assert body["status"] == "running"
    assert body["progress"] == {"stage": "estimation", "samples_done": 500, "samples_total": 1000}
    result = {"prediction": 7, "label": "7", "abstained": False, "radius": 0.41}
    store.finish_job(job_id, "succeeded", result=result)
    body = client.get(f"/v1/certifications/{job_id}").json()
    assert body["status"] == "succeeded" and body["result"] == result and body["finished"] >= body["created"]


def test_long_poll_returns_as_soon_as_the_job_ends(client, store):
    job_id = submit(client).json()["id"]
    store.start_job(job_id)
    timer = threading.Timer(0.3, store.finish_job, args=(job_id, "succeeded"), kwargs={"result": {"radius": 1.0}})
    timer.start()
    started = time.monotonic()
    body = client.get(f"/v1/certifications/{job_id}", params={"wait": 5}).json()
    timer.join()
    assert body["status"] == "succeeded" and time.monotonic() - started < 4


def test_long_poll_gives_up_at_the_deadline_and_caps_the_wait(redis_url, store):
    register(store)
    with TestClient(create_app(make_settings(redis_url, max_wait_seconds=0.3), store)) as c:
        job_id = submit(c).json()["id"]
        started = time.monotonic()
        assert c.get(f"/v1/certifications/{job_id}", params={"wait": 1000}).json()["status"] == "queued"
        assert time.monotonic() - started < 3


def test_cancel(client, store):
    job_id = submit(client).json()["id"]
    r = client.delete(f"/v1/certifications/{job_id}")
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    running = submit(client).json()["id"]
    store.start_job(running)
    r = client.delete(f"/v1/certifications/{running}")
    assert r.status_code == 202 and r.json()["status"] == "running" and store.cancel_requested(running)
    assert client.delete("/v1/certifications/" + "0" * 32).status_code == 404


def test_idempotency_key_returns_the_same_job(client, store, redis_client):
    first = submit(client, headers={"Idempotency-Key": "abc"})
    again = submit(client, headers={"Idempotency-Key": "abc"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] and again.headers["location"] == first.headers["location"]
    assert store.open_jobs() == 1 and len(broker_messages(redis_client)) == 1
    other = submit(client, {"n": 2000}, headers={"Idempotency-Key": "abc"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    assert submit(client, headers={"Idempotency-Key": "new"}).json()["id"] != first.json()["id"]


def test_a_job_of_the_other_kind_is_not_found(client):
    job_id = submit(client).json()["id"]
    r = client.get(f"/v1/predictions/{job_id}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"


def test_unknown_job_ids(client):
    for job_id in ["0" * 32, "nope", "../../etc"]:
        r = client.get(f"/v1/certifications/{job_id}")
        assert r.status_code == 404 and r.json()["error"]["code"] in ("job_not_found", "not_found")


def test_queue_full_answers_429_with_retry_after(redis_url, store, redis_client):
    register(store)
    with TestClient(create_app(make_settings(redis_url, max_queue=1), store)) as c:
        assert submit(c).status_code == 202
        r = submit(c)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert int(r.headers["retry-after"]) > 0 and store.open_jobs() == 1


def test_enqueue_failure_fails_the_job_and_answers_503(redis_url, store, redis_client):
    """The broker is unreachable after the job was stored: the job must not stay queued."""
    register(store)
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", key_prefix=PREFIX)
    with TestClient(create_app(settings, store)) as c:
        r = submit(c)
    assert r.status_code == 503 and r.json()["error"]["code"] == "enqueue_failed"
    (job_id,) = [k.decode().rsplit(":", 1)[1] for k in redis_client.keys(f"{PREFIX}:job:*")]
    job = store.get_job(job_id)
    assert job.status == "failed" and job.error["code"] == "enqueue_failed" and store.open_jobs() == 0


def test_a_retry_queues_the_job_a_killed_api_stored_but_never_queued(client, store, redis_client, monkeypatch):
    """The API process died (SIGKILL) between storing a job and queueing it: the client's
    retry with the same Idempotency-Key gets that job, which must then be queued (once),
    or it would stay queued forever."""
    from service import jobs

    class Killed(BaseException):  # not an Exception: no handler runs, as in a killed process
        pass

    def die(*args, **kwargs):
        raise Killed

    real = jobs.submit_blocking

    def killed_midway(*args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(jobs.queue, "enqueue", die)
            with pytest.raises(Killed):
                real(*args, **kwargs)
        raise ConnectionResetError("the API process died here: the client gets no answer")

    with monkeypatch.context() as m:
        m.setattr(jobs, "submit_blocking", killed_midway)
        with pytest.raises(ConnectionResetError):
            submit(client, headers={"Idempotency-Key": "k"})
    (job_id,) = [k.decode().rsplit(":", 1)[1] for k in redis_client.keys(f"{PREFIX}:job:*")]
    assert store.get_job(job_id).status == "queued" and broker_messages(redis_client) == []
    again = submit(client, headers={"Idempotency-Key": "k"})
    assert again.status_code == 202 and again.json()["id"] == job_id
    assert broker_messages(redis_client) == [("smoothcert.certify", [job_id])]
    assert submit(client, headers={"Idempotency-Key": "k"}).json()["id"] == job_id  # queued: not again
    assert len(broker_messages(redis_client)) == 1


def test_a_sigma_selector_takes_no_sigma_search_or_memory_and_says_why(client, store, redis_client):
    """A σ selector chooses σ per input with a certified choice and needs no memory: each of
    sigma, sigma_search and memory is a 422 naming the field and the reason, and nothing is
    stored or queued; without them the stored request has no σ and the memory off."""
    register(store, SELECTOR)
    base = {"model": "chooser", "input": {"tensor": X.tolist()}, "n": 1000}
    for extra, why in (({"sigma": 0.25}, "chooses sigma for each input itself"),
                       ({"sigma_search": {"method": "ddrs"}}, "certified choice, no search"),
                       ({"memory": True}, "sound without a memory")):
        before = redis_client.dbsize()
        r = client.post("/v1/certifications", json=base | extra)
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_request" and why in error["message"]
        assert error["message"].startswith(next(iter(extra))) and "sigma selector" in error["message"]
        assert redis_client.dbsize() == before
    r = client.post("/v1/predictions", json={"model": "chooser", "input": {"tensor": X.tolist()}, "sigma": 0.25})
    assert r.status_code == 422 and "chooses sigma" in r.json()["error"]["message"]
    r = client.post("/v1/certifications", json=base | {"bound": "two_sided", "memory": False})
    assert r.status_code == 202, r.text
    request = store.get_job(r.json()["id"]).request
    assert (request["sigma"], request["memory"], request["bound"]) == (None, False, "two_sided")
    assert request["seed_source"] == "server"  # drawn by the service, shown with the result
    r = client.post("/v1/predictions", json={"model": "chooser", "input": {"tensor": X.tolist()}})
    assert r.status_code == 202 and store.get_job(r.json()["id"]).request["sigma"] is None
