"""The Open Inference Protocol (v2) routes against the real stack (redis-server, a Celery
worker, uvicorn; the demo model `digits` registered by `Stack.start`), spoken by the real
clients in their default modes: Triton's `tritonclient.http` (binary tensors by default, and
JSON with `binary_data=False`) and KServe's `InferenceRESTClient`.

Every answer is checked against the same request made through /v1 (the element's seed is
`derive_seed(seed, i)`, the batch size given, so the worker draws the same noise): the
outputs must be those numbers exactly, whatever the encoding.
"""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest

tritonclient_http = pytest.importorskip("tritonclient.http")
kserve = pytest.importorskip("kserve")

from tritonclient.utils import InferenceServerException  # noqa: E402

from benchmarks.stack import USER, Stack  # noqa: E402
from clients import Client  # noqa: E402
from service.up import ROOT, worker_command  # noqa: E402
from smoothcert.imageio import decode_image  # noqa: E402
from smoothcert.sampling import derive_seed  # noqa: E402


def auth() -> dict[str, str]:
    """A new dict per call: tritonclient writes Inference-Header-Content-Length into the
    headers it is given, so a dict reused after a binary request would carry a stale one."""
    return {"Authorization": f"Bearer {USER}"}


IMAGES = np.stack([decode_image((ROOT / "examples" / f"digit-{d}.png").read_bytes(), channels=1) for d in (7, 3, 0)])
# σ = 0.5: votes split, so each answer depends on its element's seed and the comparisons with
# /v1 fail if the seeds (or the images) are not each element's own.
PREDICT = {"sigma": 0.5, "n": 500, "alpha": 0.001, "batch_size": 100}
CERTIFY = {"sigma": 0.5, "n0": 50, "n": 2000, "alpha": 0.001, "batch_size": 200}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with Stack(tmp_path_factory.mktemp("oip-logs"), device="cpu") as s:
        s.worker("worker", worker_command("oip@%h"), OMP_NUM_THREADS="1")
        url = s.api(workers=1)
        with Client(url, api_key=USER, timeout=60) as sdk:
            yield url, sdk


@pytest.fixture(scope="module")
def triton(stack):
    url, _ = stack
    with tritonclient_http.InferenceServerClient(url.removeprefix("http://"), network_timeout=120) as client:
        yield client


def through_v1(sdk, kind: str, seed: int, options: dict) -> list[dict]:
    """The results of IMAGES[i] through /v1 with seed derive_seed(seed, i): what infer must answer."""
    submit = sdk.predict if kind == "prediction" else sdk.certify
    jobs = [submit(x, model="digits", seed=derive_seed(seed, i), **options) for i, x in enumerate(IMAGES)]
    return [job.wait(timeout=120).raw["result"] for job in jobs]


def triton_input(array: np.ndarray, datatype: str = "FP32", *, binary: bool = True):
    tensor = tritonclient_http.InferInput("input", list(array.shape), datatype)
    if binary:
        tensor.set_data_from_numpy(array)  # the client's default: binary tensor data
    else:
        tensor.set_data_from_numpy(array, binary_data=False)
    return tensor


def test_triton_server_and_model_metadata(stack, triton):
    assert triton.is_server_live() and triton.is_server_ready()
    server = triton.get_server_metadata()
    assert server["name"] == "smoothcert" and server["extensions"] == ["binary_tensor_data"]
    meta = triton.get_model_metadata("digits", headers=auth())
    digest = stack[1].model("digits").digest
    assert meta["versions"] == [digest] and meta["platform"] == "smoothcert"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert {"name": "radius", "datatype": "FP64", "shape": [-1]} in meta["outputs"]
    assert triton.get_model_metadata("digits", digest, headers=auth()) == meta
    assert triton.is_model_ready("digits", headers=auth())
    assert triton.is_model_ready("digits", digest, headers=auth())
    assert not triton.is_model_ready("nope", headers=auth())
    assert not triton.is_model_ready("digits", "9", headers=auth())  # not its version
    with pytest.raises(InferenceServerException) as caught:
        triton.get_model_metadata("nope", headers=auth())
    assert caught.value.status() == "404" and "nope" in caught.value.message() and "nope" in str(caught.value)


def test_triton_predicts_a_batch_as_v1_does_binary_and_json(stack, triton):
    _, sdk = stack
    expected = through_v1(sdk, "prediction", 11, PREDICT)
    assert any(r["counts"][0] < PREDICT["n"] for r in expected)  # not unanimous: the seed matters
    params = {"seed": 11, **PREDICT}
    binary = triton.infer("digits", [triton_input(IMAGES)], parameters=params, headers=auth(), request_id="b-1")
    assert binary.get_response()["id"] == "b-1"
    assert binary.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 3 * 8  # binary by default
    assert binary.as_numpy("prediction").tolist() == [-1 if r["prediction"] is None else r["prediction"]
                                                       for r in expected]
    assert binary.as_numpy("prediction").tolist() != [-1] * 3  # real answers, not abstentions
    assert binary.as_numpy("p_value").tolist() == [r["p_value"] for r in expected]
    assert binary.as_numpy("seed").tolist() == [derive_seed(11, i) for i in range(3)]
    outputs = [tritonclient_http.InferRequestedOutput(n, binary_data=False) for n in ("prediction", "p_value")]
    as_json = triton.infer("digits", [triton_input(IMAGES, binary=False)], outputs=outputs, parameters=params,
                           headers=auth())
    assert "data" in as_json.get_output("prediction")
    assert as_json.as_numpy("prediction").tolist() == binary.as_numpy("prediction").tolist()
    assert as_json.as_numpy("p_value").tolist() == binary.as_numpy("p_value").tolist()
    pixels = np.rint(IMAGES[:1, 0] * 255).astype(np.uint8)  # UINT8 [B, H, W]: the same pixels
    one = triton.infer("digits", [triton_input(pixels, "UINT8")], parameters=params, headers=auth())
    assert one.as_numpy("prediction").tolist() == binary.as_numpy("prediction").tolist()[:1]


def test_triton_certifies_as_v1_does(stack, triton):
    _, sdk = stack
    expected = through_v1(sdk, "certification", 5, {**CERTIFY, "memory": False})
    assert any(0 < r["n_a"] < CERTIFY["n"] for r in expected)  # not unanimous: the seed matters
    params = {"smoothcert_task": "certify", "seed": 5, **CERTIFY}
    result = triton.infer("digits", [triton_input(IMAGES)], parameters=params, headers=auth())
    assert result.as_numpy("radius").dtype == np.float64
    assert result.as_numpy("radius").tolist() == [r["radius"] for r in expected]
    assert result.as_numpy("p_a_lower").tolist() == [r["p_a_lower"] for r in expected]
    assert result.as_numpy("n_a").tolist() == [r["n_a"] for r in expected]
    assert result.as_numpy("abstained").tolist() == [r["abstained"] for r in expected]
    assert max(result.as_numpy("radius")) > 0
    response = result.get_response()["parameters"]
    assert response["smoothcert_task"] == "certify" and response["memory"] is False and response["n"] == 2000


def test_triton_errors_are_its_own_exceptions(stack, triton):
    for parameters, status, words in (({"n": 3}, "400", "n"), ({"bogus": 1}, "400", "bogus"),
                                      ({"smoothcert_task": "certify", "memory": True}, "400", "memory off")):
        with pytest.raises(InferenceServerException) as caught:
            triton.infer("digits", [triton_input(IMAGES)], parameters=parameters, headers=auth())
        assert caught.value.status() == status and words in caught.value.message(), str(caught.value)
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("digits", [triton_input(IMAGES)])  # no key
    assert caught.value.status() == "401" and isinstance(caught.value.message(), str)


def test_kserve_rest_client(stack):
    url, sdk = stack
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    params = {"seed": 11, **PREDICT}

    async def run():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120))
        try:
            ready = await client.is_model_ready(url, "digits", headers=auth())
            as_json = InferInput("input", list(IMAGES.shape), "FP32", data=IMAGES)  # JSON tensor
            binary = InferInput("input", list(IMAGES.shape), "FP32")
            binary.set_data_from_numpy(IMAGES)  # the binary extension, KServe's default for this call
            answers = [await client.infer(url, InferRequest("digits", [tensor], parameters=params),
                                          model_name="digits", headers=auth()) for tensor in (as_json, binary)]
            error = None
            try:
                await client.infer(url, InferRequest("digits", [as_json], parameters={"n": 3}), model_name="digits",
                                   headers=auth())
            except Exception as exc:  # httpx.HTTPStatusError, with the server's message in it
                error = exc
            return ready, answers, error
        finally:
            await client.close()

    ready, answers, error = asyncio.run(run())
    expected = [-1 if r["prediction"] is None else r["prediction"] for r in through_v1(sdk, "prediction", 11, PREDICT)]
    assert ready is True
    for answer in answers:
        assert answer.model_name == "digits"
        prediction = next(o for o in answer.outputs if o.name == "prediction")
        assert list(prediction.data) == expected
    assert error is not None and "400" in str(error) and "n" in str(error)


def test_the_documented_tritonclient_example_runs(stack, capsys):
    """docs/api.md's tritonclient example, as written, against this stack."""
    url, _ = stack
    text = (ROOT / "docs" / "api.md").read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index("### With tritonclient"):], re.DOTALL).group(1)
    code = code.replace('"127.0.0.1:8000", "your-api-key"', f'"{url.removeprefix("http://")}", "{USER}"')
    code = code.replace('f"examples/', f'f"{ROOT}/examples/')
    scope: dict = {}
    exec(compile(code, "docs/api.md", "exec"), scope)  # noqa: S102 - our own documentation
    assert scope["predicted"].as_numpy("prediction").tolist() == [7, 3]
    assert scope["certified"].as_numpy("radius").min() > 0
    assert "400 n=3 can never predict" in capsys.readouterr().out
