"""The API against a real redis-server: the app in process (TestClient), the store and the
Celery broker on the test Redis, and a registered "digits" model (the API never loads
weights, so its weights.pt is a dummy)."""

from __future__ import annotations

import base64
import collections
import io
import json
import pathlib
import pickle
import zipfile

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.config import Settings
from service.main import create_app
from service.store import Store
from smoothcert.archive import bundle_digest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PREFIX = "t"
DIGITS = {
    "name": "digits", "kind": "standard", "input_shape": [1, 8, 8], "num_classes": 10,
    "labels": [str(i) for i in range(10)], "sigma": {"default": 0.25, "min": 0.05, "max": 1.0},
    "architecture": "mlp",
}
DRS = DIGITS | {"name": "halves", "kind": "drs"}
# A remote model (model.json alone): the API never contacts it, it only checks the allow-list.
REMOTE = {k: v for k, v in DIGITS.items() if k != "architecture"} | {
    "name": "served", "kind": "remote",
    "remote": {"endpoint": "https://triton.internal:8000", "model": "digits", "version": "3"}}
# A σ selector (docs/bundles.md): an estimator over three levels, one classifier for all.
SELECTOR = {k: v for k, v in DIGITS.items() if k != "sigma"} | {
    "name": "chooser", "kind": "selector", "selector": {"sigmas": [0.12, 0.25, 0.5], "sigma_e": 0.5}}
USER, OTHER, ADMIN = "user-key", "other-key", "admin-key"


def state_dict_bytes() -> bytes:
    """An empty state dict as torch.save lays it out (a zip with a protocol-2 data.pkl), made
    without torch: enough for the API's torch-free upload check (the API never loads weights)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(collections.OrderedDict(), protocol=2))
    return out.getvalue()


WEIGHTS = state_dict_bytes()


def bundle_zip(spec: dict, files: dict[str, bytes] | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("model.json", json.dumps(spec))
        for name, data in (files if files is not None else {"weights.pt": b"not really weights"}).items():
            zf.writestr(name, data)
    return out.getvalue()


def digest_of(spec: dict, files: dict[str, bytes]) -> str:
    return bundle_digest({"model.json": json.dumps(spec).encode(), **files})


def register(store: Store, spec: dict = DIGITS, files: dict[str, bytes] | None = None) -> str:
    if files is None:
        files = {"standard": {"weights.pt": b"w"}, "drs": {"left.pt": b"l", "right.pt": b"r"},
                 "selector": {"estimator.pt": b"e", "expert.pt": b"x"}, "remote": {}}[spec.get("kind", "standard")]
    digest = digest_of(spec, files)
    store.put_model(spec["name"], digest, spec, bundle_zip(spec, files))
    return digest


def image(shape=(1, 8, 8), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def png_b64(array: np.ndarray) -> str:
    pixels = np.rint(array[0] * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def npy_b64(array: np.ndarray) -> str:
    return base64.b64encode(npy_bytes(array)).decode()


def stored_input(store: Store, job_id: str) -> np.ndarray:
    return np.load(io.BytesIO(store.get_input(job_id)), allow_pickle=False)


def make_settings(redis_url: str, **overrides) -> Settings:
    return Settings(**{"redis_url": redis_url, "key_prefix": PREFIX, "max_wait_seconds": 5.0,
                       "job_ttl_seconds": 600, **overrides})


@pytest.fixture()
def store(redis_client) -> Store:
    return Store(redis_client, prefix=PREFIX, job_ttl_seconds=600)


@pytest.fixture()
def settings(redis_url) -> Settings:
    return make_settings(redis_url)


@pytest.fixture()
def client(settings, store) -> TestClient:
    register(store)
    with TestClient(create_app(settings, store)) as c:
        yield c


@pytest.fixture()
def keyed(redis_url, store) -> TestClient:
    """An app with API keys: USER and OTHER are users, ADMIN is an admin."""
    register(store)
    settings = make_settings(redis_url, api_keys=[USER, OTHER], admin_keys=[ADMIN])
    with TestClient(create_app(settings, store)) as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def nothing_stored(store: Store, redis_client) -> bool:
    """No job, no input, nothing enqueued."""
    return (store.open_jobs() == 0 and not redis_client.keys(f"{PREFIX}:job:*")
            and not redis_client.keys(f"{PREFIX}:input:*")
            and store.queue_depth("certifications") == 0 and store.queue_depth("predictions") == 0)
