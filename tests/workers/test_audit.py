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
