"""/v1/predictions and the Open Inference Protocol route POST /v2/models/{name}/infer."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from tests.service.conftest import (
    image,
    make_settings,
    nothing_stored,
    npy_b64,
    npy_bytes,
    register,
    stored_input,
)
from tests.service.test_certifications import broker_messages

X = image()


def test_prediction_lifecycle(client, store, redis_client):
    r = client.post("/v1/predictions", json={"model": "digits", "input": {"npy_b64": npy_b64(X)}, "seed": 3})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.headers["location"] == f"/v1/predictions/{job_id}"
    assert broker_messages(redis_client, "predictions") == [("smoothcert.predict", [job_id])]
    assert store.get_job(job_id).request == {"sigma": 0.25, "n": 10000, "alpha": 0.001, "batch_size": None,
                                             "numeric_mode": "fp32", "seed": 3, "seed_source": "caller"}
    assert np.array_equal(stored_input(store, job_id), X)
    assert client.get(f"/v1/certifications/{job_id}").status_code == 404  # the other kind
    store.start_job(job_id)
    store.finish_job(job_id, "succeeded", result={"prediction": 4, "label": "4", "abstained": False})
    body = client.get(f"/v1/predictions/{job_id}", params={"wait": 1}).json()
    assert body["status"] == "succeeded" and body["result"]["prediction"] == 4 and body["kind"] == "prediction"
    assert client.delete(f"/v1/predictions/{job_id}").json()["status"] == "succeeded"  # too late


def test_prediction_multipart(client, store):
    r = client.post("/v1/predictions", files={"image": ("x.npy", npy_bytes(X))},
                    data={"model": "digits", "n": "500", "sigma": "0.5"})
    assert r.status_code == 202, r.text
    assert store.get_job(r.json()["id"]).request["n"] == 500


def oip(data=None, shape=(1, 1, 8, 8), datatype="FP32", **parameters):
    return {"inputs": [{"name": "x", "shape": list(shape), "datatype": datatype,
                        "data": X.ravel().tolist() if data is None else data}],
            "parameters": {"seed": 1} | parameters}


def finish_when_queued(store, result, status="succeeded", code="model_error"):
    """A worker stand-in: ends the first job it sees (a failure with error `code`)."""
    def run():
        for _ in range(100):
            ids = [k.decode().rsplit(":", 1)[1] for k in store.r.keys("t:job:*")]
            if ids:
                store.start_job(ids[0])
                store.finish_job(ids[0], status, result=result,
                                 error=None if status == "succeeded" else {"code": code, "message": "NaN"})
                return
            time.sleep(0.02)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_infer_answers_the_smoothed_class(client, store):
    worker = finish_when_queued(store, {"prediction": 7, "label": "7", "abstained": False})
    r = client.post("/v2/models/digits/infer", json=oip())
    worker.join()
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "digits" and body["model_version"].startswith("sha256:")
    assert body["outputs"] == [{"name": "prediction", "shape": [1], "datatype": "INT64", "data": [7]}]
    job = store.get_job(body["id"])
    assert job.kind == "prediction" and job.request["seed"] == 1
    assert np.array_equal(stored_input(store, job.id), X)


def test_infer_abstention_is_minus_one_and_uint8_is_scaled(client, store):
    worker = finish_when_queued(store, {"prediction": None, "abstained": True})
    pixels = np.arange(64, dtype=np.uint8).tolist()
    r = client.post("/v2/models/digits/infer", json=oip(pixels, shape=(1, 8, 8), datatype="UINT8"))
    worker.join()
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [-1] and r.json()["parameters"]["abstained"] is True
    stored = stored_input(store, r.json()["id"])
    assert np.allclose(stored.ravel(), np.arange(64) / 255)


@pytest.mark.parametrize(("code", "status"), [
    ("internal", 500), ("model_error", 500), ("invalid_request", 422), ("bad_model", 409), ("time_limit", 504),
])
def test_infer_failed_job(client, store, code, status):
    """Only an unexpected worker failure is the server's 500; the request's faults are 4xx."""
    worker = finish_when_queued(store, None, status="failed", code=code)
    r = client.post("/v2/models/digits/infer", json=oip())
    worker.join()
    assert r.status_code == status and r.json()["error"]["code"] == code


def test_infer_times_out_with_the_job_to_poll(redis_url, store):
    register(store)
    with TestClient(create_app(make_settings(redis_url, max_wait_seconds=0.2), store)) as c:
        r = c.post("/v2/models/digits/infer", json=oip())
    assert r.status_code == 504
    error = r.json()["error"]
    assert error["code"] == "timeout" and error["id"] in error["message"]
    assert r.headers["location"] == f"/v1/predictions/{error['id']}"
    assert store.get_job(error["id"]).status == "queued"


def test_bad_infer_requests(client, store, redis_client):
    cases = [
        oip(X.ravel().tolist()[:10]),  # data does not fill the shape
        oip(shape=(2, 1, 8, 8)),  # a batch
        oip(shape=(1, 1, 8, 9), data=[0.5] * 72),  # the wrong shape
        oip(data=[2.0] * 64),  # outside [0, 1]
        oip(data=[300] * 64, datatype="UINT8"),
        oip(data=[0.5] * 64, datatype="UINT8"),
        oip(datatype="FP64"),
        oip(data=["a"] * 64),
        oip(data=[True] * 64),
        oip(n=3), oip(alpha=0), oip(sigma=9.0), oip(bogus=1),
        {"inputs": []},
        {"inputs": [oip()["inputs"][0]] * 2},
    ]
    for body in cases:
        r = client.post("/v2/models/digits/infer", json=body)
        assert r.status_code == 422 and set(r.json()) == {"error"}, (body, r.text)
    r = client.post("/v2/models/nope/infer", json=oip())
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert nothing_stored(store, redis_client)
