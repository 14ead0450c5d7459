"""`/v1/evaluations`: dataset uploads decoded and checked, jobs queued, artifacts served."""

from __future__ import annotations

import base64
import io
import zipfile

import numpy as np
import pytest

from smoothcert.imageio import encode_png

from .conftest import image


def npz(x, y) -> bytes:
    out = io.BytesIO()
    np.savez(out, x=x, y=y)
    return out.getvalue()


def folders(files: dict[str, np.ndarray]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, array in files.items():
            zf.writestr(name, encode_png(array))
    return out.getvalue()


def stored(store, job_id):
    with np.load(io.BytesIO(store.get_input(job_id)), allow_pickle=False) as data:
        return data["x"], data["y"]


def test_npz_upload_is_queued_with_its_request(client, store, redis_client):
    x = np.stack([image(seed=i) for i in range(6)])
    r = client.post("/v1/evaluations", data={"model": "digits", "sigma": "0.25", "n": "500", "every": "2"},
                    files={"dataset": ("test.npz", npz(x, np.arange(6)), "application/octet-stream")})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.headers["location"] == f"/v1/evaluations/{job_id}"
    job = store.get_job(job_id)
    assert job.kind == "evaluation" and job.request["every"] == 2 and job.request["n"] == 500
    sx, sy = stored(store, job_id)
    np.testing.assert_array_equal(sx, x) and np.testing.assert_array_equal(sy, np.arange(6))
    assert redis_client.llen("evaluations") == 1


def test_class_folders_and_json_base64(client, store):
    files = {f"test/{label}/{i}.png": image(seed=i) for label in ("3", "7") for i in range(2)}
    body = {"model": "digits", "dataset_b64": base64.b64encode(folders(files)).decode(), "limit": 3}
    r = client.post("/v1/evaluations", json=body)
    assert r.status_code == 202, r.text
    x, y = stored(store, r.json()["id"])
    assert x.shape == (3, 1, 8, 8) and y.tolist() == [3, 3, 7]  # limit keeps the first 3


@pytest.mark.parametrize("dataset, message", [
    (npz(np.zeros((2, 3, 8, 8), np.float32), np.array([0, 1])), "shape"),
    (npz(np.zeros((2, 1, 8, 8), np.float32), np.array([0, 12])), "labels must lie"),
    (npz(np.full((2, 1, 8, 8), np.nan, np.float32), np.array([0, 1])), "NaN"),
    (folders({"cat/0.png": image()}), "not labels of the model"),
    (b"not a zip at all", "not an .npz"),
    (npz(np.zeros((0, 1, 8, 8), np.float32), np.zeros(0, np.int64)), "no examples"),
])
def test_bad_datasets_are_refused_and_nothing_is_stored(client, redis_client, dataset, message):
    before = set(redis_client.keys("t:job:*"))
    r = client.post("/v1/evaluations", data={"model": "digits"}, files={"dataset": ("d", dataset)})
    assert r.status_code == 422 and message in r.json()["error"]["message"], r.text
    assert set(redis_client.keys("t:job:*")) == before


def test_artifacts_once_succeeded(client, store):
    r = client.post("/v1/evaluations", data={"model": "digits", "n": "200"},
                    files={"dataset": ("d.npz", npz(image()[None], np.array([4])))})
    job_id = r.json()["id"]
    assert client.get(f"/v1/evaluations/{job_id}/curve.png").status_code == 409
    store.start_job(job_id)
    store.put_artifact(job_id, "curve.png", b"\x89PNG fake")
    store.finish_job(job_id, "succeeded", result={"acr": 0.1})
    curve = client.get(f"/v1/evaluations/{job_id}/curve.png")
    assert curve.status_code == 200 and curve.headers["content-type"] == "image/png"
    assert client.get(f"/v1/evaluations/{job_id}").json()["result"] == {"acr": 0.1}
    assert client.get(f"/v1/evaluations/{job_id}/results.tsv").status_code == 404  # never written
    assert client.get(f"/v1/certifications/{job_id}").status_code == 404  # another kind's route
