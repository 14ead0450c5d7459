"""The SDK against the in-process fake server: inputs, options, jobs, registry, async parity."""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clients import (
    AsyncClient,
    AuthenticationError,
    CertificateResult,
    Client,
    ConflictError,
    InputError,
    JobFailed,
    JobTimeout,
    MemoryInfo,
    ModelRef,
    NotFoundError,
    PredictionResult,
    Progress,
)

from .conftest import BASE_URL, async_client
from .fake_server import FakeState

TENSOR = [[[0.5] * 8 for _ in range(8)]]


def image_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, format=fmt)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def sent_input(state: FakeState) -> dict:
    return state.last_job().request["input"]


def decoded(value: str) -> bytes:
    return base64.b64decode(value)


# Inputs


@pytest.mark.parametrize(("suffix", "fmt"), [(".png", "PNG"), (".jpg", "JPEG"), (".JPEG", "JPEG")])
def test_image_files_are_sent_as_image_b64(client, state, tmp_path, suffix, fmt):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(image_bytes(fmt))
    for given in (path, str(path)):
        client.certify(given, model="digits")
        assert decoded(sent_input(state)["image_b64"]) == path.read_bytes()


def test_npy_files_and_arrays_are_sent_as_npy_b64(client, state, tmp_path):
    array = np.random.default_rng(0).random((1, 8, 8), dtype=np.float32)
    (tmp_path / "x.npy").write_bytes(npy_bytes(array))
    for given in (tmp_path / "x.npy", array, array[:, :, ::2]):  # a strided view too
        client.certify(given, model="digits")
        got = np.load(io.BytesIO(decoded(sent_input(state)["npy_b64"])), allow_pickle=False)
        want = np.asarray(given if isinstance(given, np.ndarray) else array)
        assert got.dtype == want.dtype and np.array_equal(got, want)


@pytest.mark.parametrize(("data", "key"), [(image_bytes("PNG"), "image_b64"), (image_bytes("JPEG"), "image_b64"),
                                           (npy_bytes(np.zeros((1, 8, 8))), "npy_b64")])
def test_bytes_are_recognised_by_magic(client, state, data, key):
    for given in (data, bytearray(data), memoryview(data)):
        client.certify(given, model="digits")
        assert sent_input(state) == {key: base64.b64encode(data).decode()}


def test_lists_pil_images_and_input_objects(client, state):
    client.certify(TENSOR, model="digits")
    assert sent_input(state) == {"tensor": TENSOR}
    client.certify(Image.new("L", (8, 8), 7), model="digits")
    assert Image.open(io.BytesIO(decoded(sent_input(state)["image_b64"]))).getpixel((0, 0)) == 7
    client.certify({"tensor": TENSOR}, model="digits")
    assert sent_input(state) == {"tensor": TENSOR}


def test_a_pil_image_is_sent_as_the_server_would_decode_its_file(client, state):
    # Opened from a JPEG whose EXIF says "turn 90° clockwise": the server turns a file so
    # before anything else; PNG encoding drops the tag, so the client turns the image first.
    pixels = np.kron(np.arange(6, dtype=np.uint8).reshape(2, 3) * 40, np.ones((8, 8), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=100, exif=exif)
    opened = Image.open(io.BytesIO(buf.getvalue()))
    client.certify(opened, model="digits")
    sent = Image.open(io.BytesIO(decoded(sent_input(state)["image_b64"])))
    assert sent.format == "PNG" and sent.size == (16, 24) and sent.mode == "L"
    assert np.array_equal(np.asarray(sent), np.rot90(np.asarray(opened), k=-1))


@pytest.mark.parametrize("image", [
    Image.new("RGBA", (8, 8), (1, 2, 3, 0)),  # the server refuses the transparency, not the client
    Image.new("P", (8, 8), 3),
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000),  # I;16, every bit kept
    Image.new("LA", (8, 8), (5, 255)),
], ids=lambda image: image.mode)
def test_a_pil_image_keeps_its_mode_and_samples(client, state, image):
    client.certify(image, model="digits")
    sent = Image.open(io.BytesIO(decoded(sent_input(state)["image_b64"])))
    assert sent.mode == image.mode
    if image.mode == "P":  # PNG may renumber a palette: the colours are what must not change
        sent, image = sent.convert("RGB"), image.convert("RGB")
    assert np.array_equal(np.asarray(sent), np.asarray(image))


@pytest.mark.parametrize("mode", ["F", "I", "CMYK", "YCbCr"])
def test_a_pil_image_png_cannot_hold_is_refused_before_sending(client, state, mode):
    with pytest.raises(InputError, match=f"a PIL image in mode {mode} cannot be sent unchanged"):
        client.certify(Image.new(mode, (8, 8)), model="digits")
    assert state.requests == []


def test_content_decides_over_the_suffix(client, state, tmp_path):
    path = tmp_path / "really_npy.png"
    path.write_bytes(npy_bytes(np.zeros((1, 8, 8))))
    client.certify(path, model="digits")
    assert set(sent_input(state)) == {"npy_b64"}


def test_refused_inputs_send_nothing(client, state, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    for bad in (b"GIF89a....", tmp_path / "missing.png", tmp_path / "notes.txt", {"image_b64": "", "tensor": []},
                np.array([object()], dtype=object)):
        with pytest.raises(InputError):
            client.certify(bad, model="digits")
    with pytest.raises(TypeError):
        client.certify(object(), model="digits")
    assert state.requests == []


# Options


def test_only_given_options_are_sent(client, state):
    client.certify(TENSOR, model="digits")
    assert set(state.last_job().request) == {"model", "input"}
    client.certify(TENSOR, model="digits", sigma=0.5, bound="two_sided", n0=10, n=1000, alpha=0.01,
                   batch_size=100, memory=False, seed=3)
    body = state.last_job().request
    assert body == {"model": "digits", "input": {"tensor": TENSOR}, "sigma": 0.5, "bound": "two_sided",
                    "n0": 10, "n": 1000, "alpha": 0.01, "batch_size": 100, "memory": False, "seed": 3}


def test_sigma_search_accepts_a_name_or_a_dict(client, state):
    client.certify(TENSOR, model="digits", sigma_search="insta")
    assert state.last_job().request["sigma_search"] == {"method": "insta"}
    client.certify(TENSOR, model="digits", sigma_search={"method": "ddrs", "steps": 5})
    assert state.last_job().request["sigma_search"] == {"method": "ddrs", "steps": 5}


def test_unknown_options_are_a_type_error(client):
    with pytest.raises(TypeError, match="sigmaa"):
        client.certify(TENSOR, model="digits", sigmaa=0.5)
    with pytest.raises(TypeError, match="bound"):
        client.predict(TENSOR, model="digits", bound="cohen")


# Jobs


def test_certify_waits_for_a_typed_certificate(client, state):
    job = client.certify(TENSOR, model="digits", sigma_search="ddrs", seed=7)
    assert (job.kind, job.submitted.status, job.path) == ("certification", "queued", f"/v1/certifications/{job.id}")
    status = job.wait(timeout=5).raise_for_status()
    assert status.done and status.id == job.id and status.error is None
    cert = status.result
    assert isinstance(cert, CertificateResult)
    assert (cert.prediction, cert.label, cert.abstained, cert.radius, cert.sigma) == (7, "7", False, 0.41, 0.27)
    assert (cert.p_a_lower, cert.bound, cert.n0, cert.n, cert.alpha) == (0.93, "cohen", 100, 100_000, 0.001)
    assert cert.memory == MemoryInfo(used=True, outcome="new", entry="e-1", conflict=None)
    assert cert.model == ModelRef(name="digits", digest="sha256:" + "ab" * 32)
    assert cert.extra == {"seconds": 1.5, "samples": 100_100}  # keys the SDK does not know are kept
    assert status.raw["created_at"] and status.raw["result"]["radius"] == 0.41


def test_wait_reports_every_change_and_long_polls_at_most_30_s(client, state):
    seen = []
    client.certify(TENSOR, model="digits", sigma_search="ddrs").wait(poll=100, on_progress=seen.append)
    assert [s.status for s in seen] == ["queued", "running", "running", "succeeded"]
    assert seen[1].progress == Progress("sigma_search", 0, 200)
    assert seen[2].progress.fraction == 0.5
    assert state.waits == [30] * 4


def test_wait_times_out_and_the_job_goes_on(client, state):
    job = client.certify(TENSOR, model="stuck")
    started = time.monotonic()
    with pytest.raises(JobTimeout) as info:
        job.wait(timeout=0.3, poll=0.1)
    assert 0.3 <= time.monotonic() - started < 2
    assert isinstance(info.value, TimeoutError) and info.value.status.status == "running"
    assert all(w is None for w in state.waits)  # under a second left: never ask the server to hold
    assert job.status().status == "running"


def test_a_failed_job_is_returned_and_raised_on_request(client):
    status = client.certify(TENSOR, model="broken").wait(timeout=5)
    assert status.status == "failed" and status.result is None
    with pytest.raises(JobFailed) as info:
        status.raise_for_status()
    assert (info.value.code, info.value.message, info.value.job_id) == ("model_error", "logits are NaN", status.id)


def test_cancel(client):
    job = client.certify(TENSOR, model="stuck")
    assert job.cancel().status == "cancelled"
    assert job.wait(timeout=5).status == "cancelled"
    with pytest.raises(ConflictError) as info:
        job.cancel()
    assert (info.value.status_code, info.value.code) == (409, "job_finished")


def test_idempotency_key_returns_the_same_job(client, state):
    first = client.certify(TENSOR, model="digits", idempotency_key="k-1")
    again = client.certify(TENSOR, model="digits", idempotency_key="k-1")
    other = client.certify(TENSOR, model="digits")
    assert first == again and first.id != other.id and len(state.jobs) == 2
    posts = [r for r in state.requests if r["method"] == "POST"]
    keys = [r["headers"].get("idempotency-key") for r in posts]
    assert keys[:2] == ["k-1", "k-1"] and keys[2] and keys[2] != "k-1"  # made up for the call
    assert "idempotency_key" not in state.last_job().request
    client.certify(TENSOR, model="digits")  # another call, another key: another job
    assert len(state.jobs) == 3 and state.requests[-1]["headers"]["idempotency-key"] not in keys


def test_predict_is_a_prediction_job(client, state):
    job = client.predict(TENSOR, model="digits", sigma=0.5, n=1000, seed=1)
    assert job.kind == "prediction" and job.path.startswith("/v1/predictions/")
    result = job.wait(timeout=5).result
    assert isinstance(result, PredictionResult) and not hasattr(result, "radius")
    assert (result.prediction, result.sigma, result.n, result.extra) == (7, 0.5, 1000, {"p_value": 1e-9})
    assert state.last_job().request == {"model": "digits", "input": {"tensor": TENSOR}, "sigma": 0.5,
                                        "n": 1000, "seed": 1}


def test_a_job_by_id(client):
    job = client.certify(TENSOR, model="digits")
    assert client.job(job.id) == job and client.job(job.id).status().id == job.id
    with pytest.raises(NotFoundError):
        client.job(job.id, "prediction").status()


# Registry, health, auth


@pytest.mark.parametrize("bare", [False, True])
def test_models_in_either_list_shape(client, state, bare):
    state.bare_model_list = bare
    models = client.models()
    assert [m.name for m in models] == ["digits", "broken", "stuck"]
    assert models[0].input_shape == (1, 8, 8) and models[0].extra == {"created_at": "2024-01-01T00:00:00Z"}


def test_model_and_its_memory(client):
    assert client.model("digits").num_classes == 10
    memory = client.model_memory("digits")
    assert memory.size == 2 and memory.entries[0]["id"] == "e-1" and memory.capacity == 100_000
    with pytest.raises(NotFoundError, match="nope"):
        client.model("nope")


def test_upload_a_directory_a_zip_or_bytes(client, state, tmp_path: Path):
    bundle = tmp_path / "tiny"
    bundle.mkdir()
    (bundle / "model.json").write_text('{"name": "tiny", "kind": "standard"}')
    (bundle / "weights.pt").write_bytes(b"\0" * 10)
    (bundle / ".DS_Store").write_bytes(b"junk")
    info = client.upload_model(bundle)
    assert (info.name, info.kind) == ("tiny", "standard") and info.digest.startswith("sha256:")
    assert set(state.uploads[-1]) == {"model.json", "weights.pt"}
    zipped = tmp_path / "tiny.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("model.json", '{"name": "tiny2"}')
    assert client.upload_model(zipped).name == "tiny2"
    assert client.upload_model(zipped.read_bytes()).name == "tiny2"
    assert client.model("tiny").name == "tiny"


def test_delete_a_model(client, state):
    assert client.delete_model("stuck").name == "stuck" and "stuck" not in state.models
    with pytest.raises(NotFoundError):
        client.delete_model("stuck")


# Evaluations


def test_evaluate_uploads_the_data_set_and_fetches_its_files(client, state, tmp_path):
    from clients._types import EvaluationResult

    from .fake_server import CURVE, SUMMARY

    data = tmp_path / "test.npz"
    np.savez(data, x=np.zeros((3, 1, 8, 8), np.float32), y=np.array([1, 2, 3]))
    job = client.evaluate(data, model="digits", n=1000, sigma_search="ddrs", memory=True, every=2)
    assert job.kind == "evaluation" and state.requests[-1]["path"] == "/v1/evaluations"
    assert state.datasets[-1] == ("test.npz", data.read_bytes(), {"model": "digits", "n": "1000",
                                                                  "sigma_search": "ddrs", "memory": "true",
                                                                  "every": "2"})
    with pytest.raises(ConflictError):  # its files exist once it has succeeded
        client.evaluation_file(job.id, "curve.png")
    status = job.wait(timeout=5)
    assert isinstance(status.result, EvaluationResult) and status.result.count == 3
    assert status.result.certified_accuracy[1] == SUMMARY["certified_accuracy"][1] and status.result.acr == 0.4567891
    assert client.evaluation_file(job.id, "curve.png") == CURVE
    assert client.evaluation_file(job.id, "results.tsv").startswith(b"idx\t")
    with pytest.raises(ValueError, match="curve.png"):
        client.evaluation_file(job.id, "summary.json")
    client.evaluate(data.read_bytes(), model="digits", sigma_search={"method": "insta", "steps": 1})
    assert state.datasets[-1][0] == "dataset.npz" and state.datasets[-1][2]["sigma_search"] == \
        '{"method": "insta", "steps": 1}'
    sent = len(state.requests)
    with pytest.raises(InputError, match="cannot read data set"):
        client.evaluate(tmp_path / "missing.npz", model="digits")
    with pytest.raises(TypeError, match="input"):
        client.evaluate(data, model="digits", input=TENSOR)
    assert len(state.requests) == sent


def test_health(client, state):
    assert client.health() == {"ready": True, "redis": True, "workers": 1}
    state.ready = False
    assert client.health()["ready"] is False


def test_api_key_from_argument_or_environment(state, transport, monkeypatch):
    state.api_key = "secret"
    with Client(BASE_URL, transport=transport) as anonymous, pytest.raises(AuthenticationError):
        anonymous.models()
    with Client(BASE_URL, api_key="secret", transport=transport) as c:
        assert c.models()
    monkeypatch.setenv("SMOOTHCERT_API_KEY", "secret")
    with Client(BASE_URL, transport=transport) as c:
        assert c.models()
    assert state.requests[-1]["headers"]["authorization"] == "Bearer secret"


# Async parity


def test_async_client_does_what_the_sync_one_does(state, tmp_path):
    async def flow(sc: AsyncClient) -> None:
        seen = []
        job = await sc.certify(np.zeros((1, 8, 8), np.float32), model="digits", sigma_search="ddrs",
                               idempotency_key="a")
        assert job == await sc.certify(TENSOR, model="digits", idempotency_key="a")
        status = await job.wait(timeout=5, on_progress=seen.append)
        assert [s.status for s in seen] == ["queued", "running", "running", "succeeded"]
        assert status.raise_for_status().result.radius == 0.41 and status.result.extra["seconds"] == 1.5
        prediction = await (await sc.predict(TENSOR, model="digits")).wait(timeout=5)
        assert isinstance(prediction.result, PredictionResult)
        stuck = await sc.certify(TENSOR, model="stuck")
        with pytest.raises(JobTimeout):
            await stuck.wait(timeout=0.2, poll=0.05)
        assert (await stuck.cancel()).status == "cancelled"
        with pytest.raises(ConflictError):
            await stuck.cancel()
        failed = await (await sc.certify(TENSOR, model="broken")).wait(timeout=5)
        with pytest.raises(JobFailed):
            failed.raise_for_status()
        assert [m.name for m in await sc.models()] == ["digits", "broken", "stuck"]
        assert (await sc.model("digits")).num_classes == 10
        assert (await sc.model_memory("digits")).size == 2
        (tmp_path / "model.json").write_text('{"name": "tiny"}')
        assert (await sc.upload_model(tmp_path)).name == "tiny"
        assert (await sc.delete_model("tiny")).name == "tiny"
        evaluation = await (await sc.evaluate(b"PK\x05\x06" + b"\0" * 18, model="digits")).wait(timeout=5)
        assert evaluation.result.count == 3 and state.datasets[-1][0] == "dataset.zip"
        assert (await sc.evaluation_file(evaluation.id, "curve.png")).startswith(b"\x89PNG")
        assert (await sc.health())["ready"] is True
        assert (await sc.job(job.id).status()).status == "succeeded"
        with pytest.raises(NotFoundError):
            await sc.model("nope")

    async def main() -> None:
        async with async_client(state) as sc:
            await flow(sc)

    asyncio.run(main())
    assert set(state.jobs["cert-0"].request["input"]) == {"npy_b64"}


def test_importing_the_sdk_loads_neither_the_engine_nor_numpy():
    code = ("import sys, clients, clients.cli; "
            "assert not {'torch', 'numpy', 'PIL', 'smoothcert', 'service', 'workers'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_credentials_left_by_up_are_used_for_their_server_only(tmp_path):
    from clients import Client
    from clients._base import credentials_path

    path = credentials_path()
    path.parent.mkdir(parents=True)
    path.write_text('{"url": "http://127.0.0.1:8123", "api_key": "local-key"}')
    local = Client()
    assert local.base_url == "http://127.0.0.1:8123" and local.api_key == "local-key"
    other = Client("http://elsewhere:8000")
    assert other.api_key is None  # a local key is never sent to another server


def test_saved_keys_are_found_for_their_server_only(tmp_path):
    from clients._base import credentials_path, resolve_url, saved_key

    assert (resolve_url(), saved_key(resolve_url())) == ("http://127.0.0.1:8000", None)
    path = credentials_path()
    path.parent.mkdir(parents=True)
    path.write_text('{"url": "http://127.0.0.1:8123", "api_key": "user", "admin_key": "admin"}')
    assert resolve_url() == "http://127.0.0.1:8123" and resolve_url("http://x:1") == "http://x:1"
    assert (saved_key("http://127.0.0.1:8123"), saved_key("http://127.0.0.1:8123", admin=True)) == ("user", "admin")
    assert saved_key("http://127.0.0.1:8000", admin=True) is None
