"""The submit routes read the caller and the Idempotency-Key without FastAPI's dependency
solving (service.deps): they must answer and document exactly what routes declaring
`CallerDep` and `IdempotencyKeyDep` do. And the model they read is parsed once per record,
yet a replaced or deleted model is seen at once."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.deps import CallerDep, IdempotencyKeyDep
from service.main import create_app
from tests.service.conftest import ADMIN, DIGITS, PREFIX, USER, auth, image, make_settings, register

BODY = {"model": "digits", "input": {"tensor": image().tolist()}, "n": 1000}
KINDS = ("certifications", "predictions", "evaluations")
AUTHORIZATIONS = [{}, auth(USER), auth(ADMIN), {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer "},
                  {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": USER}, {"Authorization": f"bearer {USER}"}]
IDEMPOTENCY_KEYS = [None, "", " ", "k", "é".encode("latin-1"), "k" * 255, "k" * 256]


def app_with_reference(settings, store):
    """The app, plus a route that declares the two dependencies the submit routes replace."""
    app = create_app(settings, store)

    @app.post("/reference", tags=["certifications"])
    async def reference(caller: CallerDep, idempotency_key: IdempotencyKeyDep = None):
        return {"owner": caller.owner, "admin": caller.admin, "key": idempotency_key}

    return app


@pytest.mark.parametrize("keyed", [True, False])
def test_submit_routes_document_what_the_dependencies_would(redis_url, store, keyed):
    settings = make_settings(redis_url, **({"api_keys": [USER], "admin_keys": [ADMIN]} if keyed else {}))
    with TestClient(app_with_reference(settings, store)) as c:
        spec = c.get("/openapi.json").json()
    declared = spec["paths"]["/reference"]["post"]
    assert declared["security"] and declared["parameters"]  # what the comparison is about
    for kind in KINDS:
        operation = spec["paths"][f"/v1/{kind}"]["post"]
        assert operation["security"] == declared["security"], kind
        assert operation["parameters"] == declared["parameters"], kind


@pytest.mark.parametrize("keyed", [True, False])
def test_submit_routes_answer_auth_and_idempotency_keys_as_the_dependencies_would(redis_url, store, redis_client,
                                                                                  keyed):
    register(store)
    settings = make_settings(redis_url, **({"api_keys": [USER], "admin_keys": [ADMIN]} if keyed else {}))
    with TestClient(app_with_reference(settings, store)) as c:
        for authorization in AUTHORIZATIONS:
            for key in IDEMPOTENCY_KEYS:
                headers = authorization | ({} if key is None else {"Idempotency-Key": key})
                reference = c.post("/reference", headers=headers)
                for kind in ("certifications", "predictions"):
                    body = BODY if kind == "certifications" else {"model": "digits", "input": BODY["input"]}
                    r = c.post(f"/v1/{kind}", json=body, headers=headers)
                    case = (authorization, key, kind)
                    if reference.status_code != 200:  # the same refusal: status, body, headers
                        assert reference.status_code in (401, 422), case
                        assert (r.status_code, r.content, r.headers.raw) == (
                            reference.status_code, reference.content, reference.headers.raw), case
                        continue
                    assert r.status_code == 202, (case, r.text)
                    job = store.get_job(r.json()["id"])
                    assert job.owner == reference.json()["owner"], case
                    if key is not None:  # the key is the one the dependency read
                        again = c.post(f"/v1/{kind}", json=body, headers=headers)
                        assert again.json()["id"] == job.id, case
                        redis_client.delete(*redis_client.keys(f"{PREFIX}:idem:*"))  # the next case anew
                # an evaluation needs a dataset: the refusal still comes first, before the body
                if reference.status_code != 200:
                    r = c.post("/v1/evaluations", json={"model": "digits"}, headers=headers)
                    assert (r.status_code, r.content) == (reference.status_code, reference.content)


def test_a_refused_caller_is_answered_before_the_body_is_read(keyed):
    r = keyed.post("/v1/certifications", content=b"{", headers={"Content-Type": "application/json",
                                                                "Idempotency-Key": ""})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = keyed.post("/v1/certifications", content=b"{", headers=auth(USER) | {
        "Content-Type": "application/json", "Idempotency-Key": ""})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("header.Idempotency-Key: ")


def test_a_replaced_or_deleted_model_is_seen_by_the_next_submission(client, store):
    def submit(sigma: float):
        return client.post("/v1/certifications", json=BODY | {"sigma": sigma})

    first = submit(0.25)
    assert first.status_code == 202 and submit(0.25).status_code == 202  # the record parsed once, reused
    assert store.get_job(first.json()["id"]).digest == store.get_model("digits").digest
    assert submit(0.9).status_code == 202
    narrower = DIGITS | {"sigma": {"default": 0.25, "min": 0.05, "max": 0.5}}
    digest = register(store, narrower)  # the same name, another bundle and spec
    r = submit(0.25)
    assert r.status_code == 202 and store.get_job(r.json()["id"]).digest == digest
    r = submit(0.9)
    assert r.status_code == 422 and "sigma" in r.json()["error"]["message"]
    store.delete_model("digits")
    r = submit(0.25)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
