"""The OpenAPI document is precise: every 4xx it documents has the body the API answers,
FastAPI's HTTPValidationError appears nowhere, every request body has examples and every
example is a request the API accepts, the documented error examples are answers the API
gives; `/docs` renders from local files only; `GET /v1/limits` says the settings."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.schemas import DIGIT_7_PNG_B64
from tests.service.conftest import ADMIN, USER, auth, make_settings, register
from tests.service.test_infer import worker  # noqa: F401 (a fixture: a thread that answers jobs)


@pytest.fixture()
def spec(client) -> dict:
    return client.get("/openapi.json").json()


def operations(spec: dict):
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_no_fastapi_validation_error_anywhere(spec):
    text = json.dumps(spec)
    assert "HTTPValidationError" not in text and "ValidationError" not in spec["components"]["schemas"]


def test_every_4xx_has_the_body_the_api_answers(spec):
    checked = 0
    for path, method, operation in operations(spec):
        oip = path == "/v2" or path.startswith("/v2/")
        body = "OIPErrorBody" if oip else "ErrorBody"
        for status, response in operation["responses"].items():
            if not status.startswith("4"):
                continue
            ref = response["content"]["application/json"]["schema"]["$ref"]
            assert ref == f"#/components/schemas/{body}", (method, path, status)
            checked += 1
        # A route that reads a body or a query parameter can refuse it: 422 on /v1, 400 on /v2.
        if "requestBody" in operation or any(p["in"] == "query" for p in operation.get("parameters", [])):
            assert ("400" if oip else "422") in operation["responses"], (method, path)
        if operation.get("security"):
            assert "401" in operation["responses"], (method, path)
    assert checked > 50
    error = spec["components"]["schemas"]["ErrorBody"]["properties"]["error"]
    assert error == {"$ref": "#/components/schemas/ErrorOut"}


def test_every_request_body_has_examples(spec):
    bodies = 0
    for path, method, operation in operations(spec):
        for media, content in operation.get("requestBody", {}).get("content", {}).items():
            if media == "application/octet-stream":  # OIP's binary tensors: bytes, described in words
                continue
            assert content.get("examples"), (method, path, media)
            for example in content["examples"].values():
                assert example["summary"] and example["value"], (method, path, media)
            bodies += 1
    assert bodies == 9  # 3 job kinds × (JSON, multipart), the bundle upload, two OIP infer routes


def json_examples(spec: dict, path: str) -> list[dict]:
    content = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    return [example["value"] for example in content["examples"].values()]


@pytest.mark.parametrize("path", ["/v1/certifications", "/v1/predictions", "/v1/evaluations"])
def test_every_job_example_is_accepted(client, spec, path):
    examples = json_examples(spec, path)
    assert examples
    for example in examples:
        r = client.post(path, json=example)
        assert r.status_code == 202, (example, r.text)
    form = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["examples"]["form"]["value"]
    file_field = "dataset" if path == "/v1/evaluations" else "image"
    fields = {k: v if isinstance(v, str) else json.dumps(v) for k, v in form.items() if k != file_field}
    upload = (base64.b64decode(json_examples(spec, path)[0]["dataset_b64"]) if file_field == "dataset"
              else base64.b64decode(DIGIT_7_PNG_B64))
    r = client.post(path, data=fields, files={file_field: ("example", upload)})
    assert r.status_code == 202, (form, r.text)


def test_every_infer_example_is_answered(client, spec, worker):  # noqa: F811
    for example in json_examples(spec, "/v2/models/{name}/infer"):
        r = client.post("/v2/models/digits/infer", json=example)
        assert r.status_code == 200, (example, r.text)
        shape = example["inputs"][0]["shape"]
        assert all(o["shape"][0] == shape[0] for o in r.json()["outputs"])


def test_the_documented_error_examples_are_answers_the_api_gives(redis_url, store, spec):
    register(store)
    settings = make_settings(redis_url, api_keys=[USER], admin_keys=[ADMIN])

    def example(path: str, method: str, status: str) -> dict:
        return spec["paths"][path][method]["responses"][status]["content"]["application/json"]["example"]

    with TestClient(create_app(settings, store)) as c:
        answers = {
            ("/v1/models", "get", "401"): c.get("/v1/models", headers=auth("not-a-key")),
            ("/v1/models", "post", "403"): c.post("/v1/models", headers=auth(USER), files={"bundle": ("b.zip", b"")}),
            ("/v1/models/{name}", "get", "404"): c.get("/v1/models/digit", headers=auth(USER)),
            ("/v1/certifications", "post", "422"): c.post("/v1/certifications", headers=auth(USER), json={
                "model": "digits", "input": {"image_b64": DIGIT_7_PNG_B64}, "n0": 100, "n": 50}),
        }
    for (path, method, status), response in answers.items():
        assert response.status_code == int(status), response.text
        assert response.json() == example(path, method, status)


def test_operation_ids_read_as_method_names(spec):
    ids = [operation["operationId"] for _, _, operation in operations(spec)]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z]+(_[a-z0-9]+)*", i) for i in ids), ids


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline.append(data)


def page(html: str) -> _Tags:
    parser = _Tags()
    parser.feed(html)
    return parser


def test_the_api_page_loads_local_files_only(client):
    r = client.get("/docs")
    assert r.status_code == 200 and "script-src 'self'" in r.headers["content-security-policy"]
    parsed = page(r.text)
    assert not parsed.inline
    urls = [a.get("src") or a.get("href") for tag, a in parsed.tags if tag in ("script", "link")]
    assert len(urls) == 4 and not any(re.match(r"(https?:)?//", u) for u in urls), urls
    for url in urls:
        if not url.startswith("data:"):
            assert client.get(f"/{url}").status_code == 200, url
    assert client.get("/redoc").status_code == 404  # FastAPI's CDN page is off


def test_limits_are_the_settings(redis_url, store):
    settings = make_settings(redis_url, api_keys=[USER], max_n=5000, max_alpha=0.01, memory_alphas=[0.001],
                             memory_min_n=2000, rate_limit_per_second=2.0)
    with TestClient(create_app(settings, store)) as c:
        assert c.get("/v1/limits").status_code == 401
        limits = c.get("/v1/limits", headers=auth(USER)).json()
    assert limits["max_n"] == 5000 and limits["max_alpha"] == 0.01 and limits["max_n0"] == settings.max_n0
    assert limits["memory"] == {"levels": [0.001], "min_n": 2000, "quota_per_key": settings.memory_quota_per_key,
                                "capacity": settings.memory_capacity}
    assert limits["rate_limit_per_second"] == 2.0 and limits["rate_limit_burst"] == 2
    assert limits["max_wait_seconds"] == settings.max_wait_seconds
