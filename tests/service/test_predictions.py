"""/v1/predictions (the Open Inference Protocol routes, /v2, are in test_infer.py)."""

from __future__ import annotations

import numpy as np

from tests.service.conftest import image, npy_b64, npy_bytes, stored_input
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
