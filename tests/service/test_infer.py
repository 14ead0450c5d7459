"""The Open Inference Protocol (v2) routes in process against the test Redis: metadata,
readiness, inference (JSON and binary tensors in and out, batches, requested outputs, the
certify task, versioned routes) and every refusal as a 4xx with the protocol's
`{"error": "<message>"}` that stores nothing. A thread plays the worker: it ends each queued
job with a result computed from the job's own stored input and request, so that every
element's answer is checked to come from its own image and seed. The real clients against
the real stack are in tests/test_oip_clients.py."""

from __future__ import annotations

import gzip
import json
import threading
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service import oip
from service.main import create_app
from smoothcert import __version__
from tests.service.conftest import (
    DRS,
    PREFIX,
    SELECTOR,
    USER,
    auth,
    image,
    make_settings,
    nothing_stored,
    register,
    stored_input,
)

X = image()
BATCH = np.stack([image(seed=s) for s in range(3)])  # [3, 1, 8, 8]
INFER = "/v2/models/digits/infer"


def body(data=None, shape=(1, 1, 8, 8), datatype="FP32", outputs=None, **parameters):
    tensor = {"name": "input", "shape": list(shape), "datatype": datatype,
              "data": X.ravel().tolist() if data is None else data}
    request = {"inputs": [tensor], "parameters": {"seed": 1} | parameters}
    if outputs is not None:
        request["outputs"] = outputs
    return request


def fake_class(x: np.ndarray) -> int:
    """The worker stand-in's "class" of an input: a function of the stored pixels."""
    return int(np.floor(float(x.mean()) * 1000)) % 10


def fake_result(store, job) -> dict:
    """A result shaped like workers/jobs.py's, computed from the job's input and request."""
    x = stored_input(store, job.id)
    cls, req = fake_class(x), job.request
    if job.kind == "prediction":
        return {"prediction": cls, "label": str(cls), "abstained": False, "p_value": 1e-9, "seed": req["seed"],
                "batch_size": 100, "samples": req["n"], "n": req["n"], "alpha": req["alpha"], "sigma": req["sigma"]}
    halves = req["bound"] == "drs"
    return {"prediction": cls, "label": str(cls), "abstained": False, "radius": 0.1 + cls / 100,
            "p_a_lower": None if halves else 0.9, "p_b_upper": 0.05 if req["bound"] == "two_sided" else None,
            "n_a": None if halves else 950, "n_a_halves": [900, 910] if halves else None,
            "p_a_lower_halves": [0.8, 0.81] if halves else None, "n": req["n"], "noise_sigma": req["sigma"],
            "noise_tail": 3e-6, "seed": req["seed"], "batch_size": 100, "samples": req["n"] + req["n0"],
            "bound": req["bound"], "sigma": req["sigma"]}


class Worker:
    """Ends every queued job with `result(store, job)` (None: leaves jobs queued), or fails
    it with `fail` as its error code; sends heartbeats."""

    def __init__(self, store):
        self.store, self.result, self.fail = store, fake_result, None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            self.store.heartbeat("test-worker")
            for raw in self.store.r.zrange(f"{PREFIX}:jobs:open", 0, -1):
                job = self.store.get_job(raw.decode())
                if job is None or self.result is None or self.store.start_job(job.id) != "running":
                    continue
                if self.fail:
                    self.store.finish_job(job.id, "failed", error={"code": self.fail, "message": "it broke"})
                else:
                    self.store.finish_job(job.id, "succeeded", result=self.result(self.store, job))
            self.stop.wait(0.01)


@pytest.fixture()
def worker(store):
    w = Worker(store)
    w.thread.start()
    yield w
    w.stop.set()
    w.thread.join(5)


def jobs_of(store, response) -> list:
    ids = response.json()["parameters"]["smoothcert_jobs"].split(",")
    return [store.get_job(i) for i in ids]


def split_binary(response) -> tuple[dict, dict[str, np.ndarray]]:
    """The JSON header and each binary output as numpy, as a client of the extension reads them."""
    length = int(response.headers[oip.HEADER_LENGTH])
    head, rest = json.loads(response.content[:length]), response.content[length:]
    arrays, offset = {}, 0
    types = {"INT64": "<i8", "FP64": "<f8", "FP32": "<f4", "BOOL": "?"}
    for out in head["outputs"]:
        size = out.get("parameters", {}).get("binary_data_size")
        if size is not None:
            array = np.frombuffer(rest[offset:offset + size], types[out["datatype"]])
            arrays[out["name"]] = array.reshape(out["shape"])
            offset += size
    assert offset == len(rest)
    return head, arrays


def outputs(response) -> dict[str, list]:
    return {o["name"]: o["data"] for o in response.json()["outputs"]}


# --- metadata and readiness ------------------------------------------------------------------


def test_server_metadata_needs_no_key(keyed):
    r = keyed.get("/v2")
    assert r.status_code == 200, r.text
    assert r.json() == {"name": "smoothcert", "version": __version__, "extensions": ["binary_tensor_data"]}


def test_model_metadata_and_its_version(keyed, store):
    digest = store.get_model("digits").digest
    r = keyed.get("/v2/models/digits", headers=auth(USER))
    assert r.status_code == 200, r.text
    meta = r.json()
    assert meta["name"] == "digits" and meta["versions"] == [digest] and meta["platform"] == "smoothcert"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    shapes = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
    assert shapes["prediction"] == ("INT64", [-1]) and shapes["radius"] == ("FP64", [-1])
    assert shapes["abstained"] == ("BOOL", [-1]) and shapes["p_b_upper"] == ("FP64", [-1])
    assert meta["parameters"]["tasks"] == "predict,certify" and meta["parameters"]["sigma_default"] == 0.25
    assert keyed.get(f"/v2/models/digits/versions/{digest}", headers=auth(USER)).json() == meta
    for path in ("/v2/models/digits/versions/sha256:0", "/v2/models/digits/versions/1", "/v2/models/nope"):
        r = keyed.get(path, headers=auth(USER))
        assert r.status_code == 404 and isinstance(r.json()["error"], str), r.text
    r = keyed.get("/v2/models/digits")  # no key
    assert r.status_code == 401 and isinstance(r.json()["error"], str) and r.headers["www-authenticate"] == "Bearer"


def test_drs_model_metadata(client, store):
    register(store, DRS)
    meta = client.get("/v2/models/halves").json()
    shapes = {o["name"]: o["shape"] for o in meta["outputs"]}
    assert shapes["p_a_lower_halves"] == [-1, 2] and "p_value" not in shapes and "p_a_lower" not in shapes
    assert meta["parameters"]["tasks"] == "certify"


def test_a_selector_lists_its_levels_and_takes_no_sigma(client, store):
    register(store, SELECTOR)
    meta = client.get("/v2/models/chooser").json()
    assert meta["parameters"]["sigma_levels"] == "0.12,0.25,0.5" and meta["parameters"]["sigma_e"] == 0.5
    assert meta["parameters"]["tasks"] == "predict,certify"
    for task in ("predict", "certify"):
        r = client.post("/v2/models/chooser/infer", json=body(smoothcert_task=task, sigma=0.25))
        assert r.status_code == 400 and "chooses sigma for each input itself" in r.json()["error"], r.text
    assert nothing_stored(store, store.r)


def test_model_ready(client, store):
    digest = store.get_model("digits").digest
    r = client.get("/v2/models/digits/ready")  # registered, but no worker has sent a heartbeat
    assert r.status_code == 503 and "heartbeat" in r.json()["error"]
    store.heartbeat("w")
    assert client.get("/v2/models/digits/ready").json() == {"name": "digits", "ready": True}
    assert client.get(f"/v2/models/digits/versions/{digest}/ready").status_code == 200
    assert client.get("/v2/models/digits/versions/2/ready").status_code == 404
    assert client.get("/v2/models/nope/ready").status_code == 404


# --- inference ---------------------------------------------------------------------------------


def test_infer_one_image_without_content_type(client, store, worker):
    """tritonclient sends no Content-Type: the body is JSON all the same."""
    payload = json.dumps(body() | {"id": "req-1"}).encode()
    r = client.post(INFER, content=payload, headers={"content-type": ""})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    answer = r.json()
    assert answer["model_name"] == "digits" and answer["model_version"] == store.get_model("digits").digest
    assert answer["id"] == "req-1"
    (job,) = jobs_of(store, r)
    assert job.kind == "prediction" and job.request["seed"] == oip.element_seed(1, 0)
    assert np.array_equal(stored_input(store, job.id), X)
    assert outputs(r) == {"prediction": [fake_class(X)], "abstained": [False], "p_value": [1e-9],
                          "seed": [oip.element_seed(1, 0)], "batch_size": [100], "samples": [10000]}
    assert all(o["shape"] == [1] for o in answer["outputs"])
    params = answer["parameters"]
    assert params == {"smoothcert_task": "predict", "sigma": 0.25, "n": 10000, "alpha": 0.001,
                      "numeric_mode": "fp32", "seed": 1, "seed_source": "caller",
                      "model_digest": answer["model_version"], "smoothcert_jobs": job.id}


@pytest.mark.parametrize("nested", [False, True])
def test_a_batch_is_one_job_per_element(client, store, worker, nested):
    data = BATCH.tolist() if nested else BATCH.ravel().tolist()
    r = client.post(INFER, json=body(data, shape=BATCH.shape, seed=5))
    assert r.status_code == 200, r.text
    jobs = jobs_of(store, r)
    assert len(jobs) == 3 and len({j.id for j in jobs}) == 3
    for i, job in enumerate(jobs):
        assert np.array_equal(stored_input(store, job.id), BATCH[i])
        assert job.request["seed"] == oip.element_seed(5, i) and job.request["seed_source"] == "caller"
    out = outputs(r)
    assert out["prediction"] == [fake_class(x) for x in BATCH]
    assert out["seed"] == [oip.element_seed(5, i) for i in range(3)]
    assert {o["name"]: o["shape"] for o in r.json()["outputs"]}["prediction"] == [3]


def test_one_channel_batch_without_channel_axis_and_a_drawn_seed(client, store, worker):
    r = client.post(INFER, json={"inputs": [{"name": "x", "shape": [3, 8, 8], "datatype": "FP32",
                                             "data": BATCH[:, 0].tolist()}]})
    assert r.status_code == 200, r.text
    params = r.json()["parameters"]
    assert params["seed_source"] == "server" and 0 <= params["seed"] < 2**63
    jobs = jobs_of(store, r)
    assert [j.request["seed"] for j in jobs] == [oip.element_seed(params["seed"], i) for i in range(3)]
    assert all(j.request["seed_source"] == "server" for j in jobs)
    assert all(np.array_equal(stored_input(store, j.id), BATCH[i]) for i, j in enumerate(jobs))


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "FP16", "UINT8"])
def test_binary_tensor_input(client, store, worker, datatype):
    if datatype == "UINT8":
        raw = np.rint(BATCH * 255).astype(np.uint8)
        expected = raw.astype(np.float32) / np.float32(255)
    else:
        raw = BATCH.astype(oip.INPUT_DTYPES[datatype])
        expected = raw.astype(np.float32)
    blob = raw.tobytes()
    head = json.dumps({"inputs": [{"name": "input", "shape": list(raw.shape), "datatype": datatype,
                                   "parameters": {"binary_data_size": len(blob)}}],
                       "parameters": {"seed": 2}}).encode()
    r = client.post(INFER, content=head + blob, headers={oip.HEADER_LENGTH: str(len(head))})
    assert r.status_code == 200, r.text
    for i, job in enumerate(jobs_of(store, r)):
        assert np.array_equal(stored_input(store, job.id), expected[i])


def test_json_numbers_take_the_declared_precision(client, store, worker):
    r = client.post(INFER, json=body([0.1] * 64, datatype="FP16"))
    (job,) = jobs_of(store, r)
    assert np.all(stored_input(store, job.id) == np.float32(np.float16(0.1)))
    r = client.post(INFER, json=body(list(range(64)), datatype="UINT8"))
    (job,) = jobs_of(store, r)
    assert np.array_equal(stored_input(store, job.id).ravel(), np.arange(64, dtype=np.float32) / np.float32(255))


def test_binary_outputs(client, store, worker):
    r = client.post(INFER, json=body(BATCH.ravel().tolist(), shape=BATCH.shape, binary_data_output=True))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    head, arrays = split_binary(r)
    assert all("data" not in o for o in head["outputs"])
    assert arrays["prediction"].tolist() == [fake_class(x) for x in BATCH]
    assert arrays["abstained"].tolist() == [False] * 3 and arrays["p_value"].dtype == np.float64
    # Asked per output: binary_data overrides the request-wide default, in the order asked.
    asked = [{"name": "seed", "parameters": {"binary_data": False}}, {"name": "prediction"}]
    r = client.post(INFER, json=body(outputs=asked, binary_data_output=True))
    head, arrays = split_binary(r)
    assert [o["name"] for o in head["outputs"]] == ["seed", "prediction"]
    assert head["outputs"][0]["data"] == [oip.element_seed(1, 0)] and arrays["prediction"].tolist() == [fake_class(X)]
    r = client.post(INFER, json=body(outputs=[{"name": "prediction", "parameters": {"binary_data": True}}]))
    head, arrays = split_binary(r)
    assert arrays["prediction"].tolist() == [fake_class(X)]
    r = client.post(INFER, json=body(outputs=[{"name": "abstained"}]))  # JSON by default
    assert oip.HEADER_LENGTH.lower() not in r.headers and r.json()["outputs"][0]["data"] == [False]


def test_abstention_is_minus_one(client, store, worker):
    worker.result = lambda store, job: {"prediction": None, "abstained": True, "p_value": 0.4, "seed": 3}
    r = client.post(INFER, json=body())
    assert outputs(r)["prediction"] == [-1] and outputs(r)["abstained"] == [True]
    assert outputs(r)["batch_size"] == [-1]  # a value the job did not report


def test_certify_task(client, store, worker):
    r = client.post(INFER, json=body(BATCH.ravel().tolist(), shape=BATCH.shape, smoothcert_task="certify",
                                     n0=50, n=1000, alpha=0.01, sigma=0.5))
    assert r.status_code == 200, r.text
    jobs = jobs_of(store, r)
    for i, job in enumerate(jobs):
        assert job.kind == "certification" and job.request["memory"] is False and job.request["sigma"] == 0.5
        assert job.request["sigma_search"] is None and job.request["seed"] == oip.element_seed(1, i)
    out = outputs(r)
    assert list(out) == ["prediction", "abstained", "radius", "p_a_lower", "n_a", "n", "noise_sigma", "noise_tail",
                         "seed", "batch_size", "samples"]
    assert out["radius"] == [0.1 + fake_class(x) / 100 for x in BATCH] and out["n"] == [1000] * 3
    assert {o["name"]: o["datatype"] for o in r.json()["outputs"]}["radius"] == "FP64"
    params = r.json()["parameters"]
    assert params | {"seed": 0} == {
        "smoothcert_task": "certify", "sigma": 0.5, "bound": "cohen", "n0": 50, "n": 1000, "alpha": 0.01,
        "sampling": "fixed", "numeric_mode": "fp32", "memory": False, "seed": 0, "seed_source": "caller",
        "model_digest": r.json()["model_version"], "smoothcert_jobs": ",".join(j.id for j in jobs)}
    r = client.post(INFER, json=body(smoothcert_task="certify", bound="two_sided", n=1000,
                                     outputs=[{"name": "p_b_upper"}, {"name": "p_a_lower"}]))
    assert outputs(r) == {"p_b_upper": [0.05], "p_a_lower": [0.9]}


def test_certify_drs_model(client, store, worker):
    register(store, DRS)
    r = client.post("/v2/models/halves/infer", json=body(smoothcert_task="certify", n=1000))
    assert r.status_code == 200, r.text
    shapes = {o["name"]: (o["shape"], o["data"]) for o in r.json()["outputs"]}
    assert shapes["p_a_lower_halves"] == ([1, 2], [0.8, 0.81]) and shapes["n_a_halves"] == ([1, 2], [900, 910])
    r = client.post("/v2/models/halves/infer", json=body())  # DRS models do not predict
    assert r.status_code == 400 and "DRS" in r.json()["error"]


def test_a_radius_sent_as_fp32_is_rounded_down(client, store, worker):
    worker.result = lambda store, job: fake_result(store, job) | {"radius": 0.1, "p_b_upper": 0.1}
    asked = [{"name": n, "parameters": {"datatype": "FP32"}} for n in ("radius", "p_a_lower", "p_b_upper")]
    r = client.post(INFER, json=body(smoothcert_task="certify", bound="two_sided", n=1000, outputs=asked,
                                     binary_data_output=True))
    head, arrays = split_binary(r)
    assert [o["datatype"] for o in head["outputs"]] == ["FP32"] * 3
    radius, p_low, p_up = (float(arrays[n][0]) for n in ("radius", "p_a_lower", "p_b_upper"))
    assert radius <= 0.1 < float(np.nextafter(np.float32(radius), np.float32(1)))  # the float32 just below
    assert p_low <= 0.9 and p_up >= 0.1
    r = client.post(INFER, json=body(smoothcert_task="certify", n=1000, outputs=asked[:1]))  # JSON too
    assert r.json()["outputs"][0]["data"] == [radius]


def test_to_float32_never_rounds_the_wrong_way():
    values = np.random.default_rng(0).random(100_000) * 10 ** np.random.default_rng(1).uniform(-8, 3, 100_000)
    down, up = oip.to_float32(values, "down"), oip.to_float32(values, "up")
    assert down.dtype == up.dtype == np.float32
    assert np.all(down.astype(np.float64) <= values) and np.all(up.astype(np.float64) >= values)
    assert np.all(np.nextafter(down, np.float32(np.inf)).astype(np.float64) > values)  # the nearest below
    exact = np.float32([0.5, 0.25]).astype(np.float64)
    assert oip.to_float32(exact, "down").tolist() == exact.tolist() == oip.to_float32(exact, "up").tolist()
    nearest = values.astype(np.float32).astype(np.float64)
    assert np.any(nearest > values)  # plain rounding would over-claim: the check above can fail


def test_element_seed_is_the_engines_derive_seed():
    pytest.importorskip("torch")
    from smoothcert.sampling import derive_seed

    for seed in (0, 1, 7, 2**62 + 3, 2**63 - 1):
        for i in (0, 1, 2, 255):
            assert oip.element_seed(seed, i) == derive_seed(seed, i)
    assert len({oip.element_seed(9, i) for i in range(256)}) == 256


def test_versioned_infer(client, store, worker):
    digest = store.get_model("digits").digest
    r = client.post(f"/v2/models/digits/versions/{digest}/infer", json=body())
    assert r.status_code == 200 and r.json()["model_version"] == digest
    r = client.post("/v2/models/digits/versions/sha256:00/infer", json=body())
    assert r.status_code == 404 and digest in r.json()["error"]


def test_gzip_and_deflate_bodies(client, store, worker):
    raw = json.dumps(body()).encode()
    for encoding, packed in (("gzip", gzip.compress(raw)), ("deflate", zlib.compress(raw))):
        r = client.post(INFER, content=packed, headers={"content-encoding": encoding})
        assert r.status_code == 200 and outputs(r)["prediction"] == [fake_class(X)], r.text


# --- refusals --------------------------------------------------------------------------------


def binary(head: dict, blob: bytes, length: int | None = None) -> dict:
    text = json.dumps(head).encode()
    return {"content": text + blob, "headers": {oip.HEADER_LENGTH: str(len(text) if length is None else length)}}


BLOB = X.astype("<f4").tobytes()
BIN_INPUT = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": 256}}
BAD = {  # request kwargs, status, words of the message
    "not JSON": ({"content": b"{"}, 400, "not valid JSON"),
    "NaN literal": ({"content": b'{"inputs": [{"name": "x", "shape": [8, 8], "datatype": "FP32", "data": [NaN]}]}'},
                    400, "NaN"),
    "a list": ({"json": [1, 2]}, 400, "JSON object"),
    "no inputs": ({"json": {"inputs": []}}, 400, "inputs"),
    "two inputs": ({"json": {"inputs": [body()["inputs"][0]] * 2}}, 400, "one input tensor"),
    "unknown field": ({"json": body() | {"inputz": 1}}, 400, "inputz"),
    "data does not fill the shape": ({"json": body(X.ravel().tolist()[:10])}, 400, "holds 64 values"),
    "nested data not as the shape": ({"json": body(X.reshape(8, 8).tolist())}, 400, "nested exactly"),
    "ragged data": ({"json": body([[0.5] * 64, [0.5]], shape=(2, 8, 8))}, 400, "nested exactly"),
    "wrong image shape": ({"json": body([0.5] * 72, shape=(1, 1, 8, 9))}, 400, "does not fit"),
    "wrong channels": ({"json": body([0.5] * 192, shape=(1, 3, 8, 8))}, 400, "does not fit"),
    "FP32 above 1": ({"json": body([2.0] * 64)}, 400, "[0, 1]"),
    "UINT8 above 255": ({"json": body([300] * 64, datatype="UINT8")}, 400, "0-255"),
    "UINT8 not an integer": ({"json": body([0.5] * 64, datatype="UINT8")}, 400, "0-255"),
    "strings": ({"json": body(["a"] * 64)}, 400, "a number"),
    "booleans": ({"json": body([True] * 64)}, 400, "a number"),
    "huge integer": ({"json": body([10**400] * 64)}, 400, "usable number"),
    "BYTES": ({"json": body(["aGk="], datatype="BYTES", shape=(1, 1))}, 400, "BYTES is not supported"),
    "INT32": ({"json": body(datatype="INT32")}, 400, "not supported"),
    "null parameter": ({"json": body(sigma=None)}, 400, "never null"),
    "list parameter": ({"json": body(n=[1])}, 400, "scalars"),
    "unknown parameter": ({"json": body(bogus=1)}, 400, "bogus"),
    "unknown task": ({"json": body(smoothcert_task="explain")}, 400, "smoothcert_task"),
    "sequence_id": ({"json": body(sequence_id=3)}, 400, "sequences are not supported"),
    "memory on certify": ({"json": body(smoothcert_task="certify", memory=True)}, 400, "memory off"),
    "sigma search on certify": ({"json": body(smoothcert_task="certify", sigma_search="ddrs")}, 400, "fixed sigma"),
    "certify field on predict": ({"json": body(n0=10)}, 400, "not a parameter of the predict task"),
    "n as a string": ({"json": body(n="1000")}, 400, "parameters.n"),
    "n too small": ({"json": body(n=3)}, 400, "n"),
    "n above the limit": ({"json": body(n=10**9)}, 400, "SMOOTHCERT_MAX_N"),
    "sigma out of range": ({"json": body(sigma=9.0)}, 400, "range"),
    "seed too large": ({"json": body(seed=2**64)}, 400, "seed"),
    "binary_data_output not a boolean": ({"json": body(binary_data_output="yes")}, 400, "binary_data_output"),
    "timeout not microseconds": ({"json": body(timeout=0.5)}, 400, "timeout"),
    "unknown output": ({"json": body(outputs=[{"name": "logits"}])}, 400, "logits"),
    "certify output on predict": ({"json": body(outputs=[{"name": "radius"}])}, 400, "predict task"),
    "p_b_upper with cohen": ({"json": body(smoothcert_task="certify", n=1000, outputs=[{"name": "p_b_upper"}])},
                             400, "p_b_upper"),
    "output asked twice": ({"json": body(outputs=[{"name": "prediction"}] * 2)}, 400, "twice"),
    "classification": ({"json": body(outputs=[{"name": "prediction", "parameters": {"classification": 3}}])},
                       400, "classification extension"),
    "FP32 for an integer output": ({"json": body(outputs=[{"name": "prediction", "parameters": {"datatype": "FP32"}}])},
                                   400, "datatype"),
    "model_name of another model": ({"json": body() | {"model_name": "other"}}, 400, "model_name"),
    "binary size wrong": (binary({"inputs": [BIN_INPUT | {"parameters": {"binary_data_size": 255}}]}, BLOB[:255]),
                          400, "takes 256 bytes"),
    "binary bytes missing": (binary({"inputs": [BIN_INPUT]}, BLOB[:100]), 400, "binary_data_size says 256"),
    "binary bytes extra": (binary({"inputs": [BIN_INPUT]}, BLOB + b"\0"), 400, "binary_data_size says 256"),
    "binary size without the header": ({"json": {"inputs": [BIN_INPUT]}}, 400, "no Inference-Header"),
    "no data": ({"json": {"inputs": [{"name": "x", "shape": [8, 8], "datatype": "FP32"}]}}, 400, "no data"),
    "binary and data": (binary({"inputs": [BIN_INPUT | {"data": [0.5] * 64}]}, BLOB), 400, "both"),
    "bytes but no binary input": (binary(body(), b"\0\0"), 400, "no input has"),
    "header length past the body": (binary(body(), b"", length=10**6), 400, oip.HEADER_LENGTH),
    "header length not a number": (binary(body(), b"", length=-1), 400, oip.HEADER_LENGTH),
    "NaN in binary": (binary({"inputs": [BIN_INPUT]}, np.full(64, np.nan, "<f4").tobytes()), 400, "NaN"),
    "shared memory": ({"json": {"inputs": [BIN_INPUT | {"parameters": {"shared_memory_region": "r"}}]}}, 400,
                      "shared memory"),
    "unknown encoding": ({"content": b"{}", "headers": {"content-encoding": "br"}}, 415, "Content-Encoding"),
    "corrupt gzip": ({"content": b"\x1f\x8bjunk", "headers": {"content-encoding": "gzip"}}, 400, "gzip"),
    "gzip bomb": ({"content": gzip.compress(b" " * (9 * 2**20)), "headers": {"content-encoding": "gzip"}}, 413,
                  "inflates"),
    "batch too large": ({"json": body([0.5] * 64 * 257, shape=(257, 1, 8, 8))}, 413, "257"),
    "body too large": ({"content": b" " * (8 * 2**20 + 1)}, 413, "larger than"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_infer_requests(client, store, redis_client, case):
    kwargs, status, words = BAD[case]
    r = client.post(INFER, **kwargs)
    assert r.status_code == status, r.text[:500]
    assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str), r.text[:500]
    assert words in r.json()["error"], r.json()
    assert nothing_stored(store, redis_client)


def test_errors_are_strings_on_v2_only(client):
    cases = (("GET", "/v2/nothing", 404), ("GET", INFER, 405), ("POST", "/v2/models/nope/infer", 404))
    for method, path, status in cases:
        r = client.request(method, path, json=body())
        assert r.status_code == status and isinstance(r.json()["error"], str), r.text
    r = client.get("/v1/nothing")
    assert r.json()["error"]["code"] == "not_found"
    r = client.post("/v1/predictions", json={"model": "digits", "input": {"tensor": X.tolist()}, "n": 3})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize(("code", "status"), [
    ("internal", 500), ("model_error", 500), ("invalid_request", 400), ("bad_model", 409), ("time_limit", 504),
    ("remote_error", 502), ("remote_unavailable", 503),
])
def test_a_failed_job_is_answered_with_its_id(client, store, worker, code, status):
    """Only an unexpected worker failure is the server's 500; the request's faults are 4xx."""
    worker.fail = code
    r = client.post(INFER, json=body())
    assert r.status_code == status, r.text
    error = r.json()["error"]
    job_id = r.headers["location"].rsplit("/", 1)[1]
    assert isinstance(error, str) and job_id in error and "it broke" in error


def test_past_the_wait_a_504_names_every_job(redis_url, store):
    register(store)
    with TestClient(create_app(make_settings(redis_url, max_wait_seconds=0.3), store)) as c:
        r = c.post(INFER, json=body(BATCH.ravel().tolist(), shape=BATCH.shape))
        assert r.status_code == 504, r.text
        ids = [k.decode().rsplit(":", 1)[1] for k in store.r.keys(f"{PREFIX}:job:*")]
        assert len(ids) == 3 and all(i in r.json()["error"] for i in ids)
        assert "SMOOTHCERT_MAX_WAIT_SECONDS" in r.json()["error"]
        assert r.headers["location"].startswith("/v1/predictions/")
        assert all(store.get_job(i).status == "queued" for i in ids)  # they keep running
        r = c.post(INFER, json=body(timeout=50_000))  # 0.05 s, Triton's microseconds
        assert r.status_code == 504 and "within 0.05 s (the request's timeout)" in r.json()["error"]


def test_batches_take_one_rate_token_per_element(redis_url, store, redis_client):
    register(store)
    settings = make_settings(redis_url, api_keys=[USER], rate_limit_per_second=0.01, rate_limit_burst=3,
                             max_wait_seconds=0.05)
    with TestClient(create_app(settings, store)) as c:
        two = body(BATCH[:2].ravel().tolist(), shape=(2, 1, 8, 8))
        assert c.post(INFER, json=two, headers=auth(USER)).status_code == 504  # 2 tokens taken, no worker
        r = c.post(INFER, json=two, headers=auth(USER))
        assert r.status_code == 429 and isinstance(r.json()["error"], str) and "retry-after" in r.headers
        assert len(redis_client.keys(f"{PREFIX}:job:*")) == 2


def test_a_batch_over_the_key_quota_leaves_no_open_job(redis_url, store):
    register(store)
    settings = make_settings(redis_url, max_open_jobs_per_key=2, max_wait_seconds=0.05)
    with TestClient(create_app(settings, store)) as c:
        r = c.post(INFER, json=body(BATCH.ravel().tolist(), shape=BATCH.shape))
        assert r.status_code == 429 and "SMOOTHCERT_MAX_OPEN_JOBS_PER_KEY" in r.json()["error"]
    assert store.open_jobs() == 0  # the two it had queued were cancelled
