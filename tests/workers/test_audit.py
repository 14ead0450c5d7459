"""Certificates can be audited: what GET /v1/certifications/{id} shows (the model's digest,
the numeric mode, the batch size, the seed and every parameter) is enough to derive the same
certificate again with the engine alone, from the bundle the registry holds."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.up import DEMO_BUNDLE, register_bundle
from smoothcert.bundle import load_bundle
from smoothcert.certifier import Certifier
from smoothcert.imageio import check_shape, decode_image
from smoothcert.search import SigmaSearch
from tests.workers.helpers import settings_for, store_for
from workers.jobs import run_job
from workers.runtime import ModelRuntime

IMAGE = Path(__file__).resolve().parents[2] / "examples" / "digit-7.png"


@pytest.fixture()
def world(redis_url, redis_client):
    settings = settings_for(redis_url)
    store = store_for(settings)
    register_bundle(store, DEMO_BUNDLE)
    with TestClient(create_app(settings, store)) as client:
        yield client, store, ModelRuntime(store, settings), settings


@pytest.mark.parametrize("request_", [
    {"sigma": 0.25, "n0": 64, "n": 1500, "alpha": 0.01},
    {"sigma_search": {"method": "ddrs", "steps": 3}, "memory": False, "bound": "two_sided", "n": 1200},
    {"sigma": 0.5, "sampling": "adaptive", "n": 4000},
    {"sigma": 0.25, "sampling": "sequential", "target_radius": 0.25, "n": 4000},
], ids=["fixed sigma", "sigma search, two-sided", "adaptive sampling", "sequential sampling"])
def test_a_certificate_is_derived_again_from_what_it_shows(world, request_):
    client, store, runtime, settings = world
    image_b64 = base64.b64encode(IMAGE.read_bytes()).decode()
    r = client.post("/v1/certifications", json={"model": "digits", "input": {"image_b64": image_b64}, **request_})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert run_job(store, runtime, job_id, settings) == "succeeded"
    shown = client.get(f"/v1/certifications/{job_id}").json()
    result, request = shown["result"], shown["request"]

    # The digest names the registry's bundle, and the bundle loads to that digest.
    registered = client.get("/v1/models/digits").json()["digest"]
    assert result["model"]["digest"] == shown["model"]["digest"] == registered
    bundle = load_bundle(store.get_bundle(result["model"]["digest"]))
    assert bundle.digest == registered

    # Everything that produced the certificate is shown ...
    for field in ("numeric_mode", "batch_size", "seed", "bound", "n0", "n", "alpha", "sigma"):
        assert result[field] is not None, field
    assert result["seed"] == request["seed"] and result["numeric_mode"] == request["numeric_mode"]
    # ... and is enough: the engine alone, from the image the client sent, gives the same answer.
    x = check_shape(decode_image(IMAGE.read_bytes(), channels=1), bundle.spec.input_shape)
    search = request["sigma_search"]
    certifier = Certifier(bundle, device="cpu", numeric_mode=result["numeric_mode"])
    sampling = {k: result[k] for k in ("sampling", "tolerance", "target_radius") if result.get(k) is not None}
    again = certifier.certify(
        x, sigma=None if search else result["sigma"], bound=result["bound"], n0=result["n0"],
        n=result.get("n_max") or result["n"], alpha=result["alpha"], batch_size=result["batch_size"],
        seed=result["seed"], sigma_search=SigmaSearch(**search) if search else None, **sampling,
    )
    assert (again.prediction, again.radius, again.p_a_lower, again.sigma) == (
        result["prediction"], result["radius"], result["p_a_lower"], result["sigma"])
    assert again.model_digest == registered
    if search:
        assert json.loads(json.dumps(dataclasses.asdict(again.search))) == result["search"]


def test_a_memory_answer_is_derived_from_the_certificate_it_names(world):
    """An answer from the memory names its root (entry and job) and reports that
    certificate's sampling, so an auditor re-derives it: the root's radius from its bound and
    the σ its noise had, less the distance from the root's input. Never the request's own n
    or α: a lax certificate could otherwise be shown as a strict one."""
    import numpy as np

    from smoothcert import bounds

    client, store, runtime, settings = world
    image_b64 = base64.b64encode(IMAGE.read_bytes()).decode()
    x = check_shape(decode_image(IMAGE.read_bytes(), channels=1), (1, 8, 8))
    near = x.copy()
    near[0, 0, 0] = min(1.0, near[0, 0, 0] + 0.01)
    ids = []
    for body in ({"input": {"image_b64": image_b64}, "n": 1000},
                 {"input": {"tensor": near.tolist()}, "n": 5000, "n0": 50}):
        r = client.post("/v1/certifications", json={"model": "digits", "sigma": 0.25, "memory": True, **body})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
        assert run_job(store, runtime, ids[-1], settings) == "succeeded"
    root, answer = (client.get(f"/v1/certifications/{i}").json()["result"] for i in ids)
    assert root["memory"]["outcome"] == "new" and answer["memory"]["outcome"] == "inside"
    assert answer["memory"]["root_job"] == ids[0] and answer["memory"]["root"] == root["memory"]["entry"]
    for field in ("sigma", "bound", "n0", "n", "alpha", "p_a_lower", "noise_sigma", "noise_tail"):
        assert answer[field] == root[field], field  # the root's, not this request's n = 5000, n0 = 50
    derived = bounds.cohen_radius(root["noise_sigma"], root["p_a_lower"])
    distance = float(np.linalg.norm(near.astype(np.float64) - x.astype(np.float64)))
    assert root["radius"] <= derived and answer["radius"] <= derived - distance
    assert answer["guarantee"]["scope"] == "memory" and ids[0] in answer["guarantee"]["statement"]
