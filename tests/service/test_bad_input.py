"""Every bad request answers a clear 4xx with the error body, stores nothing and enqueues
nothing; no input makes the API answer 5xx."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import stat
import struct
import zipfile
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from PIL import Image

from service.main import create_app
from tests.service.conftest import (
    DIGITS,
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
    "alpha above the maximum": (body(alpha=0.06), "invalid_request", "SMOOTHCERT_MAX_ALPHA"),
    "alpha near 1": (body(alpha=1 - 1e-12), "invalid_request", "SMOOTHCERT_MAX_ALPHA"),
    "alpha not a memory level": (body(memory=True, alpha=0.02), "invalid_request", "SMOOTHCERT_MEMORY_ALPHAS"),
    "n below the memory minimum": (body(memory=True, n=500, n0=100), "invalid_request", "SMOOTHCERT_MEMORY_MIN_N"),
    "seed with the memory on": (body(memory=True, seed=7), "invalid_request", "draws the seed itself"),
    "seed with a search (memory on)": (body(sigma=None, sigma_search="ddrs", seed=7), "invalid_request",
                                       "draws the seed itself"),
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
    "unknown sampling": (body(sampling="sometimes"), "invalid_request", "sampling"),
    "tolerance with fixed sampling": (body(tolerance=0.1), "invalid_request", "tolerance applies"),
    "tolerance negative": (body(sampling="adaptive", tolerance=-0.1), "invalid_request", "tolerance"),
    "tolerance too large": (body(sampling="adaptive", tolerance=100), "invalid_request", "tolerance"),
    "tolerance as string": (body(sampling="adaptive", tolerance="0.1"), "invalid_request", "tolerance"),
    "tolerance with sequential sampling": (body(sampling="sequential", target_radius=0.5, tolerance=0.1),
                                           "invalid_request", "tolerance"),
    "sequential without target_radius": (body(sampling="sequential"), "invalid_request", "needs target_radius"),
    "target_radius with fixed sampling": (body(target_radius=0.5), "invalid_request", "target_radius applies"),
    "target_radius with adaptive sampling": (body(sampling="adaptive", target_radius=0.5),
                                             "invalid_request", "target_radius applies"),
    "target_radius negative": (body(sampling="sequential", target_radius=-0.1), "invalid_request", "target_radius"),
    "target_radius too large": (body(sampling="sequential", target_radius=1e7), "invalid_request", "target_radius"),
    "target_radius as string": (body(sampling="sequential", target_radius="0.5"), "invalid_request",
                                "target_radius"),
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
    for path in ("/v1/certifications", "/v1/predictions"):
        r = client.post(path, content=deep, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500 and r.json()["error"]["code"] == "invalid_request", r.text
    r = client.post("/v2/models/digits/infer", content=deep)  # the protocol's error: a string
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"], r.text
    shallow = {"model": "digits", "sigma": 0.25, "input": {"tensor": json.loads("[" * 500 + "]" * 500)}}
    assert client.post("/v1/certifications", json=shallow).status_code == 422
    assert nothing_stored(store, redis_client)


def test_json_nan_literals_are_refused(client, store, redis_client):
    for raw in (b'{"model": "digits", "sigma": NaN, "input": {"tensor": [[0.5]]}}',
                b'{"model": "digits", "input": {"tensor": [[NaN, 0.5]]}}',
                b'{"model": "digits", "alpha": Infinity, "input": {"tensor": [[0.5]]}}'):
        r = client.post("/v1/certifications", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
    for literal in (b"Infinity", b"-Infinity", b"NaN"):
        raw = b'{"model": "digits", "sampling": "sequential", "target_radius": %s, "input": {"tensor": [[0.5]]}}'
        r = client.post("/v1/certifications", content=raw % literal, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "target_radius" in r.json()["error"]["message"], r.text
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


# --- images: one channel rule whatever the format --------------------------------------------


def _saved(image_: Image.Image, fmt: str = "PNG", **save) -> bytes:
    out = io.BytesIO()
    image_.save(out, format=fmt, **save)
    return out.getvalue()


def _png16(colour_type: int, samples: int) -> bytes:
    """A 16-bit 8×8 PNG written by hand: PIL cannot save 16-bit colour."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + np.full(8 * samples, 4000, ">u2").tobytes() for _ in range(8))
    ihdr = struct.pack(">IIBBBBB", 8, 8, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


_NEVER = "; model 'digits' takes 1×8×8 (C×H×W); images are never resized or converted"
_OPAQUE_ONLY = "alpha is refused unless every pixel is opaque (flatten the image onto a background first)"
_HALF_CLEAR = np.dstack([np.zeros((8, 8, 3)), np.repeat([[0], [255]], 4, axis=0).repeat(8, 1)]).astype(np.uint8)
IMAGE_REFUSALS = {
    # Before, an RGB file for this one-channel model was silently made grey.
    "RGB PNG for a grey model": (_saved(Image.new("RGB", (8, 8), (200, 10, 10))),
                                 "the image is RGB 8×8 (H×W, 3 channels)" + _NEVER),
    "RGB JPEG for a grey model": (_saved(Image.new("RGB", (8, 8), (200, 10, 10)), "JPEG"),
                                  "the image is RGB 8×8 (H×W, 3 channels)" + _NEVER),
    "RGB 32×32 for a grey 8×8 model": (_saved(Image.new("RGB", (32, 32))),
                                       "the image is RGB 32×32 (H×W, 3 channels)" + _NEVER),
    "opaque RGBA": (_saved(Image.new("RGBA", (8, 8), (1, 2, 3, 255))),
                    "the image is opaque RGBA 8×8 (H×W, 3 channels)" + _NEVER),
    "palette": (_saved(Image.new("P", (8, 8))), "the image is RGB palette 8×8 (H×W, 3 channels)" + _NEVER),
    "grey 16×16": (_saved(Image.new("L", (16, 16))), "the image is greyscale 16×16 (H×W, 1 channel)" + _NEVER),
    "transparent RGBA": (_saved(Image.fromarray(_HALF_CLEAR)),
                         f"the image is RGBA 8×8 with 32 transparent or translucent pixels: {_OPAQUE_ONLY}"),
    "transparent grey+alpha": (
        _saved(Image.fromarray(np.dstack([np.zeros((8, 8), np.uint8), np.full((8, 8), 9, np.uint8)]))),
        f"the image is greyscale+alpha 8×8 with 64 transparent or translucent pixels: {_OPAQUE_ONLY}"),
    "16-bit RGB": (_png16(2, 3), "16-bit RGB PNGs are refused (they would lose their low 8 bits): save 8 bits "
                                 "per channel, 16-bit greyscale, or send the pixels as .npy"),
    "CMYK JPEG": (_saved(Image.new("CMYK", (8, 8)), "JPEG"), "CMYK images are refused: send greyscale, RGB, or "
                  "RGBA with every pixel opaque (convert CMYK to RGB with its colour profile first)"),
}


@pytest.mark.parametrize("case", IMAGE_REFUSALS, ids=list(IMAGE_REFUSALS))
def test_image_refusals_name_the_files_real_mode_and_size(client, store, redis_client, case):
    data, message = IMAGE_REFUSALS[case]
    r = client.post("/v1/certifications", json=body(input={"image_b64": base64.b64encode(data).decode()}))
    assert r.status_code == 422, r.text
    assert r.json()["error"] == {"code": "invalid_input", "message": f"input.image_b64: {message}"}
    r = client.post("/v1/predictions", files={"image": ("x.png", data)}, data={"model": "digits", "n": "1000"})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == {"code": "invalid_input", "message": f"image: {message}"}
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


# --- the matrix: every kind of bad input, each a 4xx that stores nothing ----------------------
#
# One row per case of issue 6 ("Bad input"). Each row is sent to an app with small body and
# bundle limits (1 MiB), POSTs carry an Idempotency-Key, and afterwards the Redis keys are
# exactly those before (no job, input, idempotency key, model or bundle) and the server is live.

LIMIT = 2**20


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A decompression bomb: a small PNG whose header claims width × height pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + _chunk(b"IEND", b""))


def jpeg_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.rint(array[0] * 255).astype(np.uint8), mode="L").save(out, format="JPEG")
    return out.getvalue()


def npy_header(shape: tuple, descr: str = "<f4") -> bytes:
    """A .npy with only a header: it claims `shape` and holds no data."""
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def npy_of(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=True)
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def zipped(members: dict[str, bytes], *, compress: bool = False, symlinks: tuple[str, ...] = ()) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
            if name in symlinks:
                info.create_system, info.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, data)
    return out.getvalue()


class _Payload:
    """Unpickling this would run a command; the test only pickles it (nothing unpickles it)."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


SPEC = json.dumps(DIGITS).encode()
PNG, JPEG, NPY = base64.b64decode(png_b64(X)), jpeg_bytes(X), npy_of(X)
DEEP_LISTS = b'{"model": "digits", "sigma": 0.25, "input": {"tensor": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
DEEP_OBJECTS = b'{"model": "digits", "input": ' + b'{"a":' * 100_000 + b"0" + b"}" * 100_001
JSON_HEADERS = {"content-type": "application/json"}


def cert(**fields) -> dict:
    return {"json": body(**fields)}


def raw(data: bytes, path: str = "/v1/certifications") -> tuple[str, str, dict]:
    return "POST", path, {"content": data, "headers": JSON_HEADERS}


def upload(data: bytes) -> tuple[str, str, dict]:
    return "POST", "/v1/models", {"files": {"bundle": ("b.zip", data, "application/zip")}}


def evaluate(dataset: bytes) -> tuple[str, str, dict]:
    return "POST", "/v1/evaluations", {"files": {"dataset": ("d.npz", dataset)}, "data": {"model": "digits"}}


def infer(**tensor) -> tuple[str, str, dict]:
    base = {"name": "x", "shape": [1, 8, 8], "datatype": "FP32", "data": X.ravel().tolist()}
    return "POST", "/v2/models/digits/infer", {"json": {"inputs": [base | tensor]}}


JOB = "0123456789abcdef0123456789abcdef"
C = "/v1/certifications"
# id: ((method, path, request kwargs), status, code, words of the message); code None: an Open
# Inference Protocol route, whose error is the protocol's string
MATRIX = {
    # images and arrays
    "corrupt PNG": (("POST", C, cert(input={"image_b64": b64(PNG[:40] + b"junk" * 30)})), 422, "invalid_input",
                    "corrupt"),
    "truncated PNG": (("POST", C, cert(input={"image_b64": b64(PNG[: len(PNG) // 2])})), 422, "invalid_input",
                      "truncated"),
    "corrupt JPEG": (("POST", C, cert(input={"image_b64": b64(b"\xff\xd8\xff\xe0" + b"junk" * 30)})), 422,
                     "invalid_input", "JPEG"),
    "truncated JPEG": (("POST", C, cert(input={"image_b64": b64(JPEG[: len(JPEG) // 2])})), 422, "invalid_input",
                       "truncated"),
    "corrupt NPY": (("POST", C, cert(input={"npy_b64": b64(b"\x93NUMPY\x01\x00\x10\x00{'descr': junk}\n")})), 422,
                    "invalid_input", ".npy"),
    "truncated NPY": (("POST", C, cert(input={"npy_b64": b64(NPY[:-40])})), 422, "invalid_input", "truncated"),
    "PNG bomb past PIL's limit": (("POST", C, cert(input={"image_b64": b64(png_claiming(50_000, 50_000))})), 422,
                                  "invalid_input", "decompression bomb"),
    "PNG bomb past max_pixels": (("POST", C, cert(input={"image_b64": b64(png_claiming(5_000, 5_000))})), 422,
                                 "invalid_input", "25000000 pixels"),
    "PNG bomb as a multipart file": (("POST", C, {"files": {"image": ("b.png", png_claiming(50_000, 50_000))},
                                                  "data": {"model": "digits"}}), 422, "invalid_input", "bomb"),
    "NPY bomb (header claims 10^10 pixels)": (("POST", C, cert(input={"npy_b64": b64(npy_header((1, 10**5, 10**5)))})),
                                              422, "invalid_input", "pixels"),
    "wrong shape": (("POST", C, cert(input={"tensor": image((1, 8, 9)).tolist()})), 422, "invalid_input", "shape"),
    "wrong channels": (("POST", C, cert(input={"npy_b64": npy_b64(image((3, 8, 8)))})), 422, "invalid_input",
                       "channels"),
    "NPY int64": (("POST", C, cert(input={"npy_b64": b64(npy_of(np.zeros((1, 8, 8), np.int64)))})), 422,
                  "invalid_input", "int64"),
    "NPY bool": (("POST", C, cert(input={"npy_b64": b64(npy_of(np.zeros((1, 8, 8), bool)))})), 422,
                 "invalid_input", "bool"),
    "NPY of pickled objects": (("POST", C, cert(input={"npy_b64": b64(npy_of(np.array([_Payload()] * 64,
                                                                                      object).reshape(1, 8, 8)))})),
                               422, "invalid_input", "object"),
    "OIP UINT8 above 255": (infer(datatype="UINT8", data=[300] * 64), 400, None, "UINT8"),
    "OIP unknown datatype": (infer(datatype="INT16"), 400, None, "datatype"),
    "NaN in NPY": (("POST", C, cert(input={"npy_b64": npy_b64(np.full((1, 8, 8), np.nan, np.float32))})), 422,
                   "invalid_input", "NaN"),
    "infinity in NPY": (("POST", C, cert(input={"npy_b64": npy_b64(np.full((1, 8, 8), np.inf, np.float32))})), 422,
                        "invalid_input", "infinite"),
    "NaN literal in a tensor": (raw(b'{"model": "digits", "input": {"tensor": [[NaN, 0.5]]}}'), 422,
                                "invalid_input", "NaN"),
    "1e400 (infinity) in a tensor": (raw(b'{"model": "digits", "input": {"tensor": [[1e400, 0.5]]}}'), 422,
                                     "invalid_input", "infinite"),
    "Infinity as a parameter": (raw(b'{"model": "digits", "alpha": Infinity, "input": {"tensor": [[0.5]]}}'), 422,
                                "invalid_request", "alpha"),
    "tensor above 1": (("POST", C, cert(input={"tensor": (X + 1).tolist()})), 422, "invalid_input", "[0, 1]"),
    "tensor below 0": (("POST", C, cert(input={"tensor": (X - 1).tolist()})), 422, "invalid_input", "[0, 1]"),
    "float NPY above 1": (("POST", C, cert(input={"npy_b64": npy_b64(X * 255)})), 422, "invalid_input", "[0, 1]"),
    "OIP FP32 above 1": (infer(data=[2.0] * 64), 400, None, "[0, 1]"),
    "dataset: .npz claiming 10^12 examples": (evaluate(zipped({"x.npy": npy_header((10**12, 1, 8, 8), "<f8"),
                                                               "y.npy": npy_header((10**12,), "<i8")})),
                                              422, "invalid_input", "more than the limit"),
    "dataset: .npz claiming 10^10 pixels an image": (evaluate(zipped({"x.npy": npy_header((1, 1, 10**5, 10**5)),
                                                                      "y.npy": npy_header((1,), "<i8")})),
                                                     422, "invalid_input", "do not fit"),
    "dataset: compressed .npz bomb": (evaluate(zipped({"x.npy": npy_header((100, 1, 8, 8 * 10**5)) + bytes(10**6),
                                                       "y.npy": npy_header((100,), "<i8")}, compress=True)),
                                      422, "invalid_input", "do not fit"),
    "dataset: PNG bomb in a class folder": (evaluate(zipped({"7/a.png": png_claiming(50_000, 50_000)})), 422,
                                            "invalid_input", "bomb"),
    # bodies
    "oversized body": (("POST", C, cert(input={"npy_b64": "A" * (LIMIT + 1)})), 413, "too_large", str(LIMIT)),
    "oversized streamed body": (("POST", C, {"content": iter([b"{" + b" " * LIMIT, b" " * 1000]),
                                             "headers": JSON_HEADERS}), 413, "too_large", str(LIMIT)),
    "100,000 nested lists": (raw(DEEP_LISTS), 422, "invalid_request", "nested too deeply"),
    "100,000 nested objects": (raw(DEEP_OBJECTS), 422, "invalid_request", "nested too deeply"),
    "100,000 nested lists, predictions": (raw(DEEP_LISTS, "/v1/predictions"), 422, "invalid_request", "nested"),
    "100,000 nested lists, evaluations": (raw(DEEP_LISTS, "/v1/evaluations"), 422, "invalid_request", "nested"),
    "100,000 nested lists, OIP infer": (raw(DEEP_LISTS, "/v2/models/digits/infer"), 400, None, "nested too deeply"),
    "nested form field": (("POST", C, {"files": {"image": ("x.png", PNG)},
                                       "data": {"model": "digits", "sigma_search": "{" + '"a":{' * 10_000}}), 422,
                          "invalid_request", "sigma_search"),
    # parameters
    "alpha 0": (("POST", C, cert(alpha=0.0)), 422, "invalid_request", "alpha"),
    "alpha 1": (("POST", C, cert(alpha=1.0)), 422, "invalid_request", "alpha"),
    "n0 > n": (("POST", C, cert(n0=2000, n=1000)), 422, "invalid_request", "n0"),
    "n above the limit": (("POST", C, cert(n=10**9)), 422, "invalid_request", "SMOOTHCERT_MAX_N"),
    "sigma below the model's range": (("POST", C, cert(sigma=0.01)), 422, "invalid_request", "range"),
    "sigma above the model's range": (("POST", C, cert(sigma=5.0)), 422, "invalid_request", "range"),
    "unknown search method": (("POST", C, cert(sigma=None, sigma_search="magic")), 422, "invalid_request", "method"),
    "unknown numeric mode": (("POST", C, cert(numeric_mode="fp8")), 422, "invalid_request", "fp8"),
    # unknown models and job ids
    "unknown model": (("POST", C, cert(model="nope")), 404, "model_not_found", "nope"),
    "unknown model, OIP infer": (("POST", "/v2/models/nope/infer", infer()[2]), 404, None, "nope"),
    "unknown model, GET": (("GET", "/v1/models/nope", {}), 404, "model_not_found", "nope"),
    "unknown model, memory": (("GET", "/v1/models/nope/memory", {}), 404, "model_not_found", "nope"),
    "unknown model, DELETE": (("DELETE", "/v1/models/nope", {}), 404, "model_not_found", "nope"),
    "unknown job id": (("GET", f"{C}/{JOB}", {}), 404, "job_not_found", JOB),
    "unknown job id, cancel": (("DELETE", f"/v1/predictions/{JOB}", {}), 404, "job_not_found", JOB),
    "unknown job id, curve.png": (("GET", f"/v1/evaluations/{JOB}/curve.png", {}), 404, "job_not_found", JOB),
    "malformed job id": (("GET", f"{C}/..%2F..%2Fetc%2Fpasswd", {}), 404, "not_found", ""),
    # hostile bundles
    "bundle: path traversal": (upload(zipped({"model.json": SPEC, "../weights.pt": b"w"})), 422, "invalid_bundle",
                               "unsafe path"),
    "bundle: absolute path": (upload(zipped({"model.json": SPEC, "/etc/weights.pt": b"w"})), 422, "invalid_bundle",
                              "unsafe path"),
    "bundle: symlink": (upload(zipped({"model.json": SPEC, "weights.pt": b"/etc/passwd"}, symlinks=("weights.pt",))),
                        422, "invalid_bundle", "symbolic link"),
    "bundle: zip bomb": (upload(zipped({"model.json": SPEC, "weights.pt": bytes(64 * LIMIT)}, compress=True)), 422,
                         "invalid_bundle", "larger than"),
    "bundle: too many members": (upload(zipped({"model.json": SPEC} | {f"f{i}": b"" for i in range(100)})), 422,
                                 "invalid_bundle", "members"),
    "bundle: pickle payload as weights": (upload(zipped({"model.json": SPEC,
                                                         "weights.pt": pickle.dumps(_Payload(), protocol=2)})), 422,
                                          "invalid_bundle", "system"),
    "bundle: payload in torch.save's zip": (upload(zipped({"model.json": SPEC, "weights.pt": zipped(
        {"archive/data.pkl": pickle.dumps(_Payload(), protocol=2)})})), 422, "invalid_bundle", "system"),
    "bundle: shapes that disagree": (upload(zipped({"model.json": json.dumps(
        DIGITS | {"normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}).encode(), "weights.pt": b"w"})),
                                     422, "invalid_bundle", "normalize"),
    "bundle: not a zip": (upload(b"MZ" + b"\0" * 100), 422, "invalid_bundle", "zip"),
    "bundle over the size limit": (upload(zipped({"model.json": SPEC, "weights.pt": os.urandom(LIMIT + 1)})), 413,
                                   "too_large", ""),
}


@pytest.fixture()
def small(redis_url, store):
    register(store)
    settings = make_settings(redis_url, max_body_bytes=LIMIT, max_bundle_bytes=LIMIT)
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("case", MATRIX, ids=list(MATRIX))
def test_bad_input_matrix(small, redis_client, case):
    (method, path, kwargs), status, code, words = MATRIX[case]
    before = sorted(redis_client.keys("*"))
    headers = kwargs.get("headers", {}) | ({"Idempotency-Key": f"matrix-{case}"} if method == "POST" else {})
    r = small.request(method, path, **kwargs | {"headers": headers})
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    if code is None:
        assert path.startswith("/v2/") and isinstance(error, str) and words in error, error
    else:
        assert error["code"] == code and words in error["message"], error
    assert sorted(redis_client.keys("*")) == before  # no job, input, idempotency key, model, bundle
    assert small.get("/v2/health/live").status_code == 200
