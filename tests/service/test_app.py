"""The application as a whole: layering, OpenAPI contract, Redis down, the last-resort 500."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
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
    """Operation ids are method names in generated clients: renaming one breaks them."""
    spec = client.get("/openapi.json").json()
    ids = {op["operationId"] for path in spec["paths"].values() for op in path.values()}
    assert ids == {
        "create_certification", "get_certification", "cancel_certification",
        "create_prediction", "get_prediction", "cancel_prediction",
        "create_evaluation", "get_evaluation", "cancel_evaluation", "get_evaluation_curve", "get_evaluation_results",
        "list_models", "get_model", "upload_model", "delete_model", "get_model_memory", "reset_model_memory",
        "get_limits",
        "oip_server_metadata", "oip_model_metadata", "oip_model_version_metadata", "oip_model_ready",
        "oip_model_version_ready", "oip_infer", "oip_infer_version",
        "get_liveness", "get_readiness", "get_metrics",
    }
    body = spec["paths"]["/v1/certifications"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert "CertificationRequest" in spec["components"]["schemas"]
    assert "ImageInput" in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_two_routes_of_one_name_are_refused(settings, store, monkeypatch):
    """Operation ids are route names, so a second route of a name would duplicate one."""
    from service.routes import limits

    monkeypatch.setattr(limits.router.routes[0], "name", "list_models")
    with pytest.raises(RuntimeError, match="list_models"), pytest.warns(UserWarning, match="Duplicate Operation ID"):
        create_app(settings, store).openapi()
