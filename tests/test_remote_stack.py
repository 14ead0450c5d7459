"""A model served by a real KServe model server, certified through the HTTP API of the real
stack (redis-server, a Celery worker, uvicorn): registered by an admin as a remote bundle,
certified by a user, the certificates checked against the exact answers of the linear model
it serves (tests/remote_server.py)."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

pytest.importorskip("kserve")

from benchmarks.stack import Stack
from clients import Client, UnprocessableEntityError
from service.up import worker_command
from tests.conftest import free_port
from tests.remote_server import RemoteServer
from tests.smoothcert.exact import assert_rate_at_most

ADMIN, USER = "remote-admin", "remote-user"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    server = RemoteServer(tmp_path_factory.mktemp("kserve-stack"), free_port())
    server.start()
    env = {"SMOOTHCERT_ADMIN_KEYS": ADMIN, "SMOOTHCERT_API_KEYS": USER,
           "SMOOTHCERT_REMOTE_ENDPOINTS": server.url}
    try:
        with Stack(tmp_path_factory.mktemp("remote-stack"), device="cpu", env=env) as stack:
            stack.worker("worker", worker_command("remote@%h"), OMP_NUM_THREADS="1")
            yield stack.api(workers=1), server
    finally:
        server.stop()


def bundle(url: str, endpoint: str | None = None) -> bytes:
    spec = {"name": "served-tiny", "kind": "remote", "input_shape": [1, 4, 4], "num_classes": 2,
            "labels": ["low", "high"], "sigma": {"default": 0.25, "min": 0.05, "max": 1.0},
            "remote": {"endpoint": endpoint or url, "model": "tiny", "input": "x", "output": "output"}}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("model.json", json.dumps(spec))
    return out.getvalue()


def test_a_served_model_is_certified_through_the_api_and_its_certificates_are_sound(served):
    url, server = served
    with Client(url, api_key=ADMIN) as admin:
        with pytest.raises(UnprocessableEntityError, match="allow-list"):
            admin.upload_model(bundle(server.url, "http://10.1.2.3:8000"))
        assert admin.upload_model(bundle(server.url)).name == "served-tiny"
    rng = np.random.default_rng(0)
    points, exact = [], []
    for k in range(24):
        offset = (1 if k % 2 else -1) * rng.uniform(0.05, 0.4) / 4
        wiggle = rng.uniform(-0.2, 0.2, (1, 4, 4))
        x = (0.5 + offset + wiggle - wiggle.mean()).astype(np.float32)
        points.append(x)
        exact.append((int(x.astype(np.float64).mean() > 0.5), 4 * abs(float(x.astype(np.float64).mean()) - 0.5)))
    with Client(url, api_key=USER) as user:
        with pytest.raises(UnprocessableEntityError, match="memory"):
            user.certify(points[0].tolist(), model="served-tiny", memory=True, n=1000)
        jobs = [user.certify(x.tolist(), model="served-tiny", sigma=0.25, n=2000) for x in points]
        results = [job.wait(timeout=120) for job in jobs]
    violations = 0
    for status, (truth, radius) in zip(results, exact, strict=True):
        assert status.status == "succeeded", status.raw["error"]
        r = status.result
        assert r.remote["endpoint"] == server.url and r.remote["canary_digest"].startswith("sha256:")
        violations += not r.abstained and (r.prediction != truth or r.radius > radius)
    assert_rate_at_most(violations, len(results), 0.001, "certificates of a served model")
    assert sum(not s.result.abstained for s in results) >= len(results) // 2
