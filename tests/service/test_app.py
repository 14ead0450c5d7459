"""The application as a whole: layering, OpenAPI contract, Redis down, the last-resort 500."""

from __future__ import annotations

import subprocess
import sys
import time

from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from tests.conftest import free_port
from tests.service.conftest import ROOT, image


def test_the_api_never_imports_torch_nor_the_workers():
    code = ("import sys, service.main; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'workers'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={"SMOOTHCERT_REDIS_URL": "redis://127.0.0.1:1/0", "PATH": ""})


def test_redis_down_is_503_with_a_clear_message():
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_app(settings)) as c:
        started = time.monotonic()
        for method, path, kw in [
            ("POST", "/v1/certifications", {"json": {"model": "digits", "input": {"tensor": image().tolist()}}}),
            ("GET", "/v1/certifications/" + "0" * 32, {}),
            ("GET", "/v1/models", {}),
            ("GET", "/metrics", {}),
        ]:
            r = c.request(method, path, **kw)
            assert r.status_code == 503, r.text
            assert r.json() == {"error": {"code": "unavailable",
                                          "message": "the job store (Redis) is not reachable; retry shortly"}}
        assert time.monotonic() - started < 15  # fails fast, no long retry loop
        r = c.get("/v2/health/ready")
        assert r.status_code == 503 and "Redis" in r.json()["error"]["message"]
        assert c.get("/v2/health/live").status_code == 200


def test_a_bug_answers_a_generic_500(settings, store):
    app = create_app(settings, store)

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret detail")

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom")
    assert r.status_code == 500 and "secret" not in r.text
    assert r.json()["error"]["code"] == "internal"


def test_unknown_routes_and_methods_use_the_error_body(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.put("/v1/certifications")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = client.get("/v1/certifications/" + "0" * 32, params={"wait": "soon"})
    assert r.status_code == 422 and "wait" in r.json()["error"]["message"]


def test_openapi_operation_ids_are_stable(client):
    spec = client.get("/openapi.json").json()
    ids = {op["operationId"] for path in spec["paths"].values() for op in path.values()}
    assert ids == {
        "certifications-create_certification", "certifications-get_certification",
        "certifications-cancel_certification", "predictions-create_prediction",
        "predictions-get_prediction", "predictions-cancel_prediction", "models-list_models",
        "models-get_model", "models-upload_model", "models-delete_model", "models-get_memory",
        "models-reset_memory",
        "inference-infer", "inference-infer_version", "inference-server_metadata", "inference-model_metadata",
        "inference-model_version_metadata", "inference-model_ready", "inference-model_version_ready",
        "health-live", "health-ready", "metrics-metrics",
        "evaluations-create_evaluation", "evaluations-get_evaluation", "evaluations-cancel_evaluation",
        "evaluations-get_evaluation_curve", "evaluations-get_evaluation_results",
    }
    body = spec["paths"]["/v1/certifications"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert "CertificationRequest" in spec["components"]["schemas"]
    assert "ImageInput" in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200
