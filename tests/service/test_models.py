"""The model registry (/v1/models) and the memory endpoints, with API keys."""

from __future__ import annotations

import collections
import io
import pickle
import warnings
import zipfile

from fastapi.testclient import TestClient

from service.deps import owner_id
from service.main import create_app
from smoothcert.archive import inspect_bundle, read_bundle_files
from tests.service.conftest import (
    ADMIN,
    DIGITS,
    DRS,
    SELECTOR,
    USER,
    WEIGHTS,
    auth,
    bundle_zip,
    digest_of,
    make_settings,
    register,
)


def upload(client, data: bytes, key: str | None = ADMIN):
    headers = auth(key) if key else {}
    return client.post("/v1/models", files={"bundle": ("b.zip", data, "application/zip")}, headers=headers)


def test_list_and_read(keyed, store):
    register(store, DRS)
    models = keyed.get("/v1/models", headers=auth(USER)).json()["models"]
    assert [m["name"] for m in models] == ["digits", "halves"]
    digits = keyed.get("/v1/models/digits", headers=auth(USER)).json()
    assert digits["digest"] == digest_of(DIGITS, {"weights.pt": b"w"})
    assert (digits["kind"], digits["input_shape"], digits["num_classes"]) == ("standard", [1, 8, 8], 10)
    assert digits["labels"] == DIGITS["labels"] and digits["sigma"] == {"default": 0.25, "min": 0.05, "max": 1.0}
    assert digits["spec"] == DIGITS
    r = keyed.get("/v1/models/nope", headers=auth(USER))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_upload_is_admin_only(keyed, store):
    spec = DIGITS | {"name": "mine"}
    data = bundle_zip(spec, {"weights.pt": WEIGHTS, "README.md": b"notes"})
    r = upload(keyed, data, key=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    r = upload(keyed, data, key=USER)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert store.get_model("mine") is None
    r = upload(keyed, data)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/v1/models/mine"
    # The loader's digest (model.json + network, the README aside), and the bundle as sent.
    _, _, digest = inspect_bundle(read_bundle_files(data))
    assert r.json()["digest"] == digest == store.get_model("mine").digest
    assert store.get_bundle(digest) == data
    assert keyed.get("/v1/models/mine", headers=auth(USER)).json()["name"] == "mine"


def test_bad_bundles_are_422(keyed, store):
    def zipped(files):
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        return out.getvalue()

    cases = {
        "not a zip": b"hello",
        "no model.json": zipped({"weights.pt": b"w"}),
        "bad json": zipped({"model.json": b"{", "weights.pt": b"w"}),
        "deep json": zipped({"model.json": b"[" * 10_000 + b"]" * 10_000, "weights.pt": b"w"}),
        "bad spec": bundle_zip(DIGITS | {"num_classes": 1}),
        "no network": bundle_zip(DIGITS, {}),
        "two forms": bundle_zip(DIGITS, {"weights.pt": b"w", "model.pt2": b"p"}),
        "unsafe path": zipped({"model.json": b"{}", "../evil": b"x"}),
    }
    for name, data in cases.items():
        r = upload(keyed, data)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_bundle", (name, r.text)
    r = keyed.post("/v1/models", headers=auth(ADMIN), data={"name": "x"})
    assert r.status_code in (415, 422), r.text
    assert [m.name for m in store.list_models()] == ["digits"]


def test_weights_naming_a_member_twice_are_422(keyed, store):
    # Two benign pickles under one name: zipfile (the check) and torch (the loader) may read
    # different ones, so the upload is refused for the duplicate itself.
    doubled = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Duplicate name", UserWarning)
        with zipfile.ZipFile(doubled, "w") as zf:
            for content in (collections.OrderedDict(), {"w": None}):
                zf.writestr("archive/data.pkl", pickle.dumps(content, protocol=2))
    spec = DIGITS | {"name": "doubled"}
    r = upload(keyed, bundle_zip(spec, {"weights.pt": doubled.getvalue()}))
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_bundle", r.text
    assert "weights.pt is a zip that holds the member 'archive/data.pkl' twice" in r.json()["error"]["message"]
    assert store.get_model("doubled") is None
    assert upload(keyed, bundle_zip(spec, {"weights.pt": WEIGHTS})).status_code == 201  # the clean one is taken


def test_memory_routes_address_every_namespace(keyed, store):
    """Every numeric mode, device type and α of the model is listed, and reset together with
    the keys' commit counts; a caller sees its own count."""
    digest = store.get_model("digits").digest
    strict, lax = f"{digest}/fp32/cpu/0.001", f"{digest}/bf16+fuse/cuda/0.05"
    user = owner_id(USER)
    for i in range(3):
        assert store.memory_commit(strict, epoch=0, length=i, job_id=f"j{i}", entry=b"e" * 100, capacity=10,
                                   owner=user).status == "committed"
    assert store.memory_commit(lax, epoch=0, length=0, job_id="k", entry=b"e" * 100, capacity=10).status == "committed"
    memory = keyed.get("/v1/models/digits/memory", headers=auth(USER)).json()
    assert memory["entries"] == memory["size"] == 4 and memory["your_commits"] == 3
    assert [(m["numeric_mode"], m["device"], m["alpha"], m["entries"]) for m in memory["namespaces"]] == [
        ("bf16+fuse", "cuda", 0.05, 1), ("fp32", "cpu", 0.001, 3)]
    assert memory["bytes"] > 400 and memory["capacity"] > 0 and memory["levels"] == [0.001, 0.01, 0.05]
    assert memory["min_n"] > 0 and memory["quota_per_key"] > 0
    assert keyed.delete("/v1/models/digits/memory", headers=auth(USER)).status_code == 403
    r = keyed.delete("/v1/models/digits/memory", headers=auth(ADMIN))
    assert r.status_code == 200 and r.json()["entries"] == 0
    assert store.memory_epoch(strict) == store.memory_epoch(lax) == 1
    assert store.memory_commits_of(digest, user) == 0
    assert keyed.get("/v1/models/nope/memory", headers=auth(USER)).status_code == 404


def test_upload_size_limit(redis_url, store):
    settings = make_settings(redis_url, max_bundle_bytes=1000, max_body_bytes=100)
    with TestClient(create_app(settings, store)) as c:
        big = bundle_zip(DIGITS, {"weights.pt": bytes(range(256)) * 400})
        r = upload(c, big, key=None)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        small = bundle_zip(DIGITS, {"weights.pt": WEIGHTS})  # above max_body_bytes, fine for bundles
        assert len(small) > 100 and upload(c, small, key=None).status_code == 201


def test_delete_is_admin_only(keyed, store):
    digest = store.get_model("digits").digest
    namespace = f"{digest}/fp32/cpu/0.001"
    store.memory_commit(namespace, epoch=0, length=0, job_id="j", entry=b"e", capacity=10)
    assert keyed.delete("/v1/models/digits").status_code == 401
    r = keyed.delete("/v1/models/digits", headers=auth(USER))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert store.get_model("digits") is not None
    r = keyed.delete("/v1/models/digits", headers=auth(ADMIN))
    assert r.status_code == 200 and r.json()["name"] == "digits" and r.json()["digest"] == digest
    assert keyed.get("/v1/models/digits", headers=auth(USER)).status_code == 404
    assert keyed.get("/v1/models", headers=auth(USER)).json()["models"] == []
    assert store.get_bundle(digest) is None
    assert store.memory_size(namespace)[0] == 1  # the memory belongs to the digest: it stays
    r = keyed.delete("/v1/models/digits", headers=auth(ADMIN))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = keyed.post("/v1/certifications", json={"model": "digits", "input": {"tensor": [[0.5] * 8] * 8}},
                   headers=auth(USER))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_bundle_another_name_uses_is_kept(store):
    digest = register(store)
    store.put_model("alias", digest, DIGITS, b"zip")
    assert store.delete_model("digits").digest == digest
    assert store.get_bundle(digest) == b"zip" and store.get_model("alias") is not None
    assert store.delete_model("alias").name == "alias"
    assert store.get_bundle(digest) is None and store.list_models() == []
    assert store.delete_model("alias") is None


def test_a_selector_bundle_uploads_with_its_levels(keyed, store):
    files = {"estimator.pt": WEIGHTS, "expert.pt": WEIGHTS}
    r = upload(keyed, bundle_zip(SELECTOR, files))
    assert r.status_code == 201, r.text
    body = keyed.get("/v1/models/chooser", headers=auth(USER)).json()
    assert body["kind"] == "selector" and body["spec"]["selector"]["sigmas"] == [0.12, 0.25, 0.5]
    assert body["sigma"] == {"default": 0.12, "min": 0.12, "max": 0.5}  # the levels' range
    r = upload(keyed, bundle_zip(SELECTOR | {"name": "half"}, {"estimator.pt": WEIGHTS}))
    assert r.status_code == 422 and "lacks expert.pt" in r.json()["error"]["message"]
