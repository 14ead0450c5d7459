"""API keys: who may call, and who sees which job."""

from __future__ import annotations

import hashlib

from tests.service.conftest import ADMIN, OTHER, USER, auth, image

BODY = {"model": "digits", "input": {"tensor": image().tolist()}, "n": 1000}


def test_keys_are_required_when_configured(keyed, store, redis_client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dXNlcjpwYXNz"},
                    {"Authorization": "Bearer "}, {"Authorization": USER}):
        r = keyed.post("/v1/certifications", json=BODY, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", headers
        assert USER not in r.text
        assert keyed.get("/v1/models", headers=headers).status_code == 401
    assert store.open_jobs() == 0
    # Probes and scrapers carry no key.
    assert keyed.get("/v2/health/live").status_code == 200
    assert keyed.get("/metrics").status_code == 200


def test_a_key_sees_only_its_own_jobs(keyed, store):
    r = keyed.post("/v1/certifications", json=BODY, headers=auth(USER))
    assert r.status_code == 202
    job_id = r.json()["id"]
    assert store.get_job(job_id).owner == hashlib.sha256(USER.encode()).hexdigest()[:16]
    assert keyed.get(f"/v1/certifications/{job_id}", headers=auth(USER)).status_code == 200
    for key in (OTHER, ADMIN):
        r = keyed.get(f"/v1/certifications/{job_id}", headers=auth(key))
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
        assert keyed.delete(f"/v1/certifications/{job_id}", headers=auth(key)).status_code == 404
    assert store.get_job(job_id).status == "queued" and not store.cancel_requested(job_id)


def test_idempotency_keys_are_per_caller(keyed):
    headers = {"Idempotency-Key": "same"}
    mine = keyed.post("/v1/certifications", json=BODY, headers=auth(USER) | headers).json()["id"]
    theirs = keyed.post("/v1/certifications", json=BODY, headers=auth(OTHER) | headers).json()["id"]
    assert mine != theirs


def test_open_api_has_no_owner(client, store):
    job_id = client.post("/v1/certifications", json=BODY).json()["id"]
    assert store.get_job(job_id).owner is None
    assert client.get(f"/v1/certifications/{job_id}").status_code == 200
