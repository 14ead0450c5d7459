"""Every bad request answers a clear 4xx with the error body, stores nothing and enqueues
nothing; no input makes the API answer 5xx."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from service.main import create_app
from tests.service.conftest import (
    DRS,
    image,
    make_settings,
    nothing_stored,
    npy_b64,
    png_b64,
    register,
)

X = image()
TENSOR = {"tensor": X.tolist()}


def body(**fields):
    return {"model": "digits", "input": TENSOR, "sigma": 0.25, "n": 1000} | fields


BAD = {
    "corrupt image": (body(input={"image_b64": base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"junk" * 10).decode()}),
                      "invalid_input", "corrupt"),
    "not an image": (body(input={"image_b64": base64.b64encode(b"GIF89a....").decode()}), "invalid_input", "GIF"),
    "not base64": (body(input={"image_b64": "%%%"}), "invalid_input", "base64"),
    "wrong shape": (body(input={"tensor": image((1, 8, 9)).tolist()}), "invalid_input", "shape"),
    "wrong channels": (body(input={"npy_b64": npy_b64(image((3, 8, 8)))}), "invalid_input", "channels"),
    "NaN in npy": (body(input={"npy_b64": npy_b64(np.full((1, 8, 8), np.nan, np.float32))}), "invalid_input", "NaN"),
    "values above 1": (body(input={"tensor": (X * 255).tolist()}), "invalid_input", "[0, 1]"),
    "negative values": (body(input={"tensor": (X - 1).tolist()}), "invalid_input", "[0, 1]"),
    "ragged tensor": (body(input={"tensor": [[0.5, 0.5], [0.5]]}), "invalid_input", "ragged"),
    "two inputs": (body(input={"tensor": X.tolist(), "npy_b64": npy_b64(X)}), "invalid_request", "exactly one"),
    "no input": ({"model": "digits", "sigma": 0.25}, "invalid_request", "input"),
    "alpha 0": (body(alpha=0), "invalid_request", "alpha"),
    "alpha 1": (body(alpha=1.0), "invalid_request", "alpha"),
    "alpha -0.5": (body(alpha=-0.5), "invalid_request", "alpha"),
    "n0 > n": (body(n0=2000, n=1000), "invalid_request", "n0"),
    "n above max_n": (body(n=10**9), "invalid_request", "MAX_N"),
    "n0 above max_n0": (body(n0=200_000, n=1_000_000), "invalid_request", "MAX_N0"),
    "batch above max": (body(batch_size=10**6), "invalid_request", "MAX_BATCH_SIZE"),
    "n infeasible": (body(n=5, n0=5), "invalid_request", "can never certify"),
    "n as string": (body(n="1000"), "invalid_request", "n"),
    "n as bool": (body(n=True), "invalid_request", "n"),
    "sigma below range": (body(sigma=0.01), "invalid_request", "range"),
    "sigma above range": (body(sigma=5.0), "invalid_request", "range"),
    "sigma negative": (body(sigma=-1), "invalid_request", "sigma"),
    "sigma and search": (body(sigma_search="ddrs"), "invalid_request", "not both"),
    "unknown search method": (body(sigma=None, sigma_search="magic"), "invalid_request", "method"),
    "search init out of range": (body(sigma=None, sigma_search={"method": "ddrs", "init": 9.0}),
                                 "invalid_request", "range"),
    "search steps too many": (body(sigma=None, sigma_search={"method": "ddrs", "steps": 10**6}),
                              "invalid_request", "steps"),
    "unknown bound": (body(bound="three_sided"), "invalid_request", "bound"),
    "drs bound on a standard model": (body(bound="drs"), "invalid_request", "DRS"),
    "seed negative": (body(seed=-1), "invalid_request", "seed"),
    "seed too large": (body(seed=2**64), "invalid_request", "seed"),
    "unknown field": (body(sigmaa=0.3), "invalid_request", "sigmaa"),
    "model name with a slash": (body(model="../x"), "invalid_request", "model"),
    "not an object": ([1, 2, 3], "invalid_request", "dictionary"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_certification_requests(client, store, redis_client, case):
    payload, code, words = BAD[case]
    r = client.post("/v1/certifications", json=payload)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == code and words in error["message"], error
    assert nothing_stored(store, redis_client)


def test_unknown_model_is_404(client, store, redis_client):
    r = client.post("/v1/certifications", json=body(model="nope"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert nothing_stored(store, redis_client)


def test_drs_models_take_only_the_drs_bound_and_a_fixed_sigma(client, store, redis_client):
    register(store, DRS)
    x = {"tensor": X.tolist()}
    for fields in ({"bound": "cohen"}, {"sigma": None, "sigma_search": "ddrs"}):
        r = client.post("/v1/certifications", json=body(model="halves", input=x, **fields))
        assert r.status_code == 422, r.text
    r = client.post("/v1/predictions", json={"model": "halves", "input": x})
    assert r.status_code == 422 and "DRS" in r.json()["error"]["message"]
    assert nothing_stored(store, redis_client)
    assert client.post("/v1/certifications", json=body(model="halves", input=x)).status_code == 202


@pytest.mark.parametrize("raw", [b"{", b'{"model": "digits",}', b"\xff\xfe", b""])
def test_malformed_json(client, store, redis_client, raw):
    r = client.post("/v1/certifications", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    assert nothing_stored(store, redis_client)


def test_deeply_nested_json_is_a_4xx(client, store, redis_client):
    deep = b'{"model": "digits", "input": {"tensor": ' + b"[" * 10_000 + b"]" * 10_000 + b"}}"
    for path in ("/v1/certifications", "/v1/predictions", "/v2/models/digits/infer"):
        r = client.post(path, content=deep, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500 and r.json()["error"]["code"] == "invalid_request", r.text
    shallow = {"model": "digits", "sigma": 0.25, "input": {"tensor": json.loads("[" * 500 + "]" * 500)}}
    assert client.post("/v1/certifications", json=shallow).status_code == 422
    assert nothing_stored(store, redis_client)


def test_json_nan_literals_are_refused(client, store, redis_client):
    for raw in (b'{"model": "digits", "sigma": NaN, "input": {"tensor": [[0.5]]}}',
                b'{"model": "digits", "input": {"tensor": [[NaN, 0.5]]}}',
                b'{"model": "digits", "alpha": Infinity, "input": {"tensor": [[0.5]]}}'):
        r = client.post("/v1/certifications", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
    assert nothing_stored(store, redis_client)


def test_oversized_body_is_413(redis_url, store, redis_client):
    register(store)
    with TestClient(create_app(make_settings(redis_url, max_body_bytes=10_000), store)) as c:
        big = body(input={"npy_b64": "A" * 20_000})
        r = c.post("/v1/certifications", json=big)  # refused from Content-Length
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        assert "10000" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: refused while the body streams in
            yield json.dumps(big).encode()[:8000]
            yield b" " * 8000

        r = c.post("/v1/certifications", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        r = c.post("/v1/certifications", files={"image": ("x.npy", b"\x93NUMPY" + b"0" * 20_000)},
                   data={"model": "digits"})
        assert r.status_code == 413
    assert nothing_stored(store, redis_client)


def test_bad_multipart(client, store, redis_client):
    ok = {"model": "digits", "sigma": "0.25", "n": "1000"}
    png = base64.b64decode(png_b64(X))
    cases = [  # (files, fields, words of the message)
        ({"seed": (None, "3")}, ok, "needs a file part named 'image'"),  # multipart without a file
        ({"image": ("x.png", png), "other": ("o.png", png)}, ok, "files"),  # a 400 of the parser
        ({"image": ("x.png", b"junk")}, ok, "unsupported image format"),
        ({"image": ("x.png", png)}, ok | {"n": "many"}, "n"),
        ({"image": ("x.png", png)}, ok | {"sigma_search": "{not json"}, "sigma_search"),
        ({"image": ("x.png", png)}, ok | {"memory": "yes"}, "memory"),
        ({"image": ("x.png", png)}, ok | {"extra": "1"}, "extra"),
    ]
    for files, data, words in cases:
        r = client.post("/v1/certifications", files=files, data=data)
        assert r.status_code in (400, 422), (words, r.text)
        assert words in r.json()["error"]["message"], r.text
    r = client.post("/v1/certifications", content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert nothing_stored(store, redis_client)


def test_bad_predictions(client, store, redis_client):
    x = {"tensor": X.tolist()}
    for fields in ({"n": 3}, {"alpha": 2}, {"sigma": 3.0}, {"n0": 10}, {"bound": "cohen"}, {"n": 10**9}):
        r = client.post("/v1/predictions", json={"model": "digits", "input": x} | fields)
        assert r.status_code == 422, (fields, r.text)
    assert nothing_stored(store, redis_client)


# --- property: random requests never make the API answer 5xx -------------------------------

junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=8),
                 st.floats(allow_nan=False, allow_infinity=False), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
small_tensors = st.integers(1, 9).flatmap(lambda w: st.lists(
    st.lists(st.floats(-0.5, 1.5), min_size=w, max_size=w), min_size=1, max_size=9))
bad_inputs = st.one_of(
    st.builds(lambda t: {"tensor": t}, small_tensors),
    st.builds(lambda s: {"image_b64": s}, st.text(max_size=12)),
    st.builds(lambda s: {"npy_b64": s}, st.text(max_size=12)),
    st.dictionaries(st.sampled_from(["tensor", "image_b64", "npy_b64", "x"]), junk, max_size=2), junk,
)
# Mostly plausible values (some out of range, some inconsistent with each other) ...
plausible = st.fixed_dictionaries(
    {"model": st.sampled_from(["digits", "digits", "nope"]),
     "input": st.sampled_from([TENSOR, {"npy_b64": npy_b64(X)}, {"image_b64": png_b64(X)}])},
    optional={
        "sigma": st.floats(0.01, 1.2), "bound": st.sampled_from(["cohen", "two_sided", "drs"]),
        "sigma_search": st.sampled_from(["ddrs", "insta", "magic"]) | st.fixed_dictionaries({}, optional={
            "method": st.sampled_from(["ddrs", "insta"]), "steps": st.integers(-1, 20_000),
            "lr": st.floats(0, 1), "samples": st.integers(0, 5000), "init": st.floats(0, 2)}),
        "n0": st.integers(0, 200_000), "n": st.integers(0, 2_000_000), "alpha": st.floats(-0.1, 1.1),
        "batch_size": st.integers(0, 30_000), "memory": st.booleans(), "seed": st.integers(-5, 2**64),
    })
FIELDS = ["model", "input", "sigma", "bound", "sigma_search", "n0", "n", "alpha", "batch_size", "memory", "seed"]


@st.composite
def requests(draw) -> dict:
    """... with up to two fields replaced by junk or removed."""
    payload = draw(plausible)
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=2, unique=True)):
        action = draw(st.sampled_from(["junk", "drop", "bad input"]))
        if action == "drop":
            payload.pop(key, None)
        else:
            payload[key] = draw(bad_inputs if action == "bad input" else junk)
    return payload


@hyp_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=requests())
def test_random_requests_answer_202_or_4xx(client, payload):
    for path in ("/v1/certifications", "/v1/predictions"):
        r = client.post(path, json=payload)
        assert r.status_code == 202 or (400 <= r.status_code < 500 and set(r.json()) == {"error"}), r.text
