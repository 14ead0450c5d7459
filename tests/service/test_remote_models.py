"""Remote models through the API (docs/bundles.md, "Remote models"): only endpoints in the
operator's allow-list are registered, by admins, and requests a remote model cannot serve
soundly (a memory, a σ search, another numeric mode) are refused at submit."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.main import create_app
from tests.service.conftest import ADMIN, REMOTE, USER, auth, bundle_zip, image, make_settings, nothing_stored, register

X_TENSOR = {"tensor": image().tolist()}


def upload(client: TestClient, spec: dict, key: str = ADMIN):
    return client.post("/v1/models", files={"bundle": ("b.zip", bundle_zip(spec, {}), "application/zip")},
                       headers=auth(key))


def test_only_allowed_endpoints_are_registered_and_only_by_admins(redis_url, store, redis_client):
    closed = make_settings(redis_url, api_keys=[USER], admin_keys=[ADMIN])
    with TestClient(create_app(closed, store)) as c:
        r = upload(c, REMOTE)
        assert r.status_code == 422 and "SMOOTHCERT_REMOTE_ENDPOINTS" in r.json()["error"]["message"]
        assert store.get_model("served") is None
    allowed = make_settings(redis_url, api_keys=[USER], admin_keys=[ADMIN],
                            remote_endpoints=["https://triton.internal:8000"])
    with TestClient(create_app(allowed, store)) as c:
        assert upload(c, REMOTE, key=USER).status_code == 403
        r = upload(c, REMOTE)
        assert r.status_code == 201, r.text
        assert r.json()["kind"] == "remote" and r.json()["spec"]["remote"]["model"] == "digits"
        elsewhere = REMOTE | {"remote": REMOTE["remote"] | {"endpoint": "https://triton.internal:9000"}}
        assert upload(c, elsewhere).status_code == 422
        stray = bundle_zip(REMOTE, {"weights.pt": b"w"})
        r = c.post("/v1/models", files={"bundle": ("b.zip", stray, "application/zip")}, headers=auth(ADMIN))
        assert r.status_code == 422 and "no network file" in r.json()["error"]["message"]


def test_a_remote_model_takes_a_fixed_sigma_without_memory_in_fp32(redis_url, store, redis_client):
    register(store, REMOTE)
    settings = make_settings(redis_url, remote_endpoints=["https://triton.internal:8000"])
    with TestClient(create_app(settings, store)) as c:
        base = {"model": "served", "input": X_TENSOR, "n": 1000}
        for extra, words in (({"memory": True}, "memory"), ({"sigma_search": "ddrs"}, "sigma_search"),
                             ({"numeric_mode": "bf16"}, "numeric_mode")):
            r = c.post("/v1/certifications", json=base | extra)
            assert r.status_code == 422 and words in r.json()["error"]["message"], r.text
            assert nothing_stored(store, redis_client)
        r = c.post("/v1/predictions", json={"model": "served", "input": X_TENSOR, "numeric_mode": "bf16"})
        assert r.status_code == 422 and "numeric_mode" in r.json()["error"]["message"]
        assert c.post("/v1/certifications", json=base | {"sigma": 0.3}).status_code == 202
