"""An in-process stand-in for the smoothcert API, shaped as docs/api.md's HTTP contract.

It exists only until the real `service/` can run in tests. Jobs advance one step per GET,
so tests are deterministic and never sleep:

- model "digits": queued → running (sigma_search or selection) → running (estimation) → succeeded
  (with `FakeState.loading`, a first running step in stage "loading", as a worker's first job
  on a model shows)
- model "broken": queued → running → failed (error code "model_error")
- model "stuck":  queued → running forever, progress unchanged
- evaluations (multipart, a `dataset` file): queued → running (evaluation 0/N) → succeeded
  with a summary; then `curve.png` and `results.tsv`.

With `admin_key` set, model uploads and deletions need it (403 for another valid key) and
every other /v1 route takes either key.

`?wait` is validated (whole seconds, 0–30) and recorded, not slept. Everything received
is kept on `FakeState` for assertions. Results carry keys the SDK does not know
("seconds", "samples", "conflict"), to check that it stays lenient.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import json
import zipfile
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response

DIGITS = {"name": "digits", "kind": "standard", "input_shape": [1, 8, 8], "num_classes": 10,
          "labels": [str(i) for i in range(10)], "sigma": {"default": 0.25, "min": 0.05, "max": 1.0},
          "digest": "sha256:" + "ab" * 32, "created_at": "2024-01-01T00:00:00Z"}
PATHS = {"certification": "certifications", "prediction": "predictions", "evaluation": "evaluations"}
SUMMARY = {"schema": "smoothcert.evaluation/1", "parameters": {"bound": "cohen", "memory": False}, "count": 3,
           "clean_accuracy": 1.0, "abstention_rate": 0.0, "acr": 0.4567891,
           "certified_accuracy": [{"radius": 0.0, "accuracy": 1.0, "count": 3},
                                  {"radius": 0.25, "accuracy": 2 / 3, "count": 2}],
           "sigma": {"mean": 0.25, "min": 0.25, "max": 0.25}, "seconds": {"mean": 0.1, "total": 0.3},
           "samples": {"mean": 1100.0, "search_mean": None, "certification_mean": 1100.0, "estimation_mean": 1000.0},
           "memory": None}
CURVE = b"\x89PNG\r\n\x1a\nfake curve"
TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class FakeJob:
    id: str
    kind: str
    request: dict[str, Any]
    steps: list[dict[str, Any]]
    step: int = 0

    def body(self) -> dict[str, Any]:
        base = {"id": self.id, "status": "queued", "progress": None, "result": None, "error": None}
        return base | self.steps[self.step] | {"created_at": "2024-01-01T00:00:00Z"}


@dataclass
class FakeState:
    api_key: str | None = None
    admin_key: str | None = None
    ready: bool = True
    loading: bool = False  # jobs pass through stage "loading" first
    bare_model_list: bool = False
    models: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        name: DIGITS | {"name": name} for name in ("digits", "broken", "stuck")})
    jobs: dict[str, FakeJob] = field(default_factory=dict)
    idempotency: dict[tuple[str, str], str] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    waits: list[int | None] = field(default_factory=list)
    uploads: list[dict[str, bytes]] = field(default_factory=list)
    datasets: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)  # (filename, bytes, form)
    _ids: Any = field(default_factory=itertools.count)

    def last_job(self) -> FakeJob:
        return list(self.jobs.values())[-1]


class FakeAPIError(Exception):
    def __init__(self, status: int, code: str, message: str):
        self.status, self.code, self.message = status, code, message


def _steps(kind: str, body: dict[str, Any], loading: bool = False) -> list[dict[str, Any]]:
    steps = _job_steps(kind, body)
    if loading:
        steps.insert(1, {"status": "running", "progress": {"stage": "loading", "samples_done": 0, "samples_total": 0}})
    return steps


def _job_steps(kind: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    model, n = body["model"], body.get("n", 100_000)
    if kind == "evaluation":
        count = SUMMARY["count"]
        return [{}, {"status": "running", "progress": {"stage": "evaluation", "samples_done": 0,
                                                        "samples_total": count}},
                {"status": "succeeded", "result": SUMMARY,
                 "progress": {"stage": "evaluation", "samples_done": count, "samples_total": count}}]
    first = "sigma_search" if body.get("sigma_search") else "selection"
    running = [{"status": "running", "progress": {"stage": first, "samples_done": 0, "samples_total": 200}},
               {"status": "running", "progress": {"stage": "estimation", "samples_done": n // 2,
                                                  "samples_total": n}}]
    if model == "stuck":
        return [{}, running[1] | {"progress": {"stage": "estimation", "samples_done": 10, "samples_total": n}}]
    if model == "broken":
        return [{}, running[0], {"status": "failed",
                                 "error": {"code": "model_error", "message": "logits are NaN"}}]
    ref = {"name": model, "digest": DIGITS["digest"]}
    if kind == "prediction":
        result = {"prediction": 7, "label": "7", "abstained": False, "sigma": body.get("sigma", 0.25),
                  "n": n, "alpha": body.get("alpha", 0.001), "model": ref, "p_value": 1e-9}
    else:
        memory = {"used": True, "outcome": "new", "entry": "e-1", "radius_before": None, "conflict": None}
        result = {"prediction": 7, "label": "7", "abstained": False, "radius": 0.41, "sigma": 0.27,
                  "p_a_lower": 0.93, "bound": body.get("bound", "cohen"), "n0": body.get("n0", 100),
                  "n": n, "alpha": body.get("alpha", 0.001), "memory": memory, "model": ref,
                  "seconds": 1.5, "samples": 100_100}
    done = {"status": "succeeded", "result": result,
            "progress": {"stage": "estimation", "samples_done": n, "samples_total": n}}
    return [{}, *running, done]


def _form_value(raw: str) -> Any:
    """A form field as the real API reads it: JSON where it parses, else the text."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def create_app(state: FakeState) -> FastAPI:
    app = FastAPI(title="fake smoothcert")

    @app.exception_handler(FakeAPIError)
    async def _error(request: Request, exc: FakeAPIError) -> JSONResponse:
        return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, exc.status)

    @app.middleware("http")
    async def _record_and_authenticate(request: Request, call_next: Any) -> Any:
        state.requests.append({"method": request.method, "path": request.url.path,
                               "query": dict(request.query_params), "headers": dict(request.headers)})
        given = request.headers.get("authorization")
        keys = {f"Bearer {k}" for k in (state.api_key, state.admin_key) if k}
        if keys and request.url.path.startswith("/v1"):
            if given not in keys:
                return JSONResponse({"error": {"code": "unauthorized", "message": "bad API key"}}, 401)
            admin_route = request.url.path.startswith("/v1/models") and request.method in ("POST", "DELETE")
            if admin_route and state.admin_key and given != f"Bearer {state.admin_key}":
                return JSONResponse({"error": {"code": "forbidden", "message": "needs an admin key"}}, 403)
        return await call_next(request)

    def find(kind: str, job_id: str) -> FakeJob:
        job = state.jobs.get(job_id)
        if job is None or job.kind != kind:
            raise FakeAPIError(404, "job_not_found", f"no {kind} {job_id!r}")
        return job

    for kind, path in PATHS.items():
        def routes(kind: str = kind, path: str = path) -> None:
            @app.post(f"/v1/{path}", status_code=202)
            async def submit(request: Request) -> JSONResponse:
                if kind == "evaluation":
                    form = await request.form()
                    upload = form.get("dataset")
                    if upload is None or isinstance(upload, str):
                        raise FakeAPIError(422, "invalid_request", "a multipart request needs a 'dataset' file")
                    fields = {k: v for k, v in form.items() if isinstance(v, str)}
                    state.datasets.append((upload.filename, await upload.read(), fields))
                    body = {k: _form_value(v) for k, v in fields.items()}
                else:
                    body = await request.json()
                if body.get("model") not in state.models:
                    raise FakeAPIError(404, "model_not_found", f"no model {body.get('model')!r}")
                given = body.get("input")
                if kind != "evaluation" and (not isinstance(given, dict) or len(given) != 1
                                             or not set(given) <= {"image_b64", "npy_b64", "tensor"}):
                    raise FakeAPIError(422, "invalid_input", "input needs one of image_b64, npy_b64, tensor")
                key = request.headers.get("idempotency-key")
                job_id = state.idempotency.get((kind, key)) if key else None
                if job_id is None:
                    job_id = f"{kind[:4]}-{next(state._ids)}"
                    state.jobs[job_id] = FakeJob(job_id, kind, body, _steps(kind, body, state.loading))
                    if key:
                        state.idempotency[(kind, key)] = job_id
                return JSONResponse({"id": job_id, "status": "queued"}, 202,
                                    headers={"Location": f"/v1/{path}/{job_id}"})

            @app.get(f"/v1/{path}/{{job_id}}")
            async def get(job_id: str, wait: int | None = Query(None, ge=0, le=30)) -> dict[str, Any]:
                state.waits.append(wait)
                job = find(kind, job_id)
                body = job.body()
                job.step = min(job.step + 1, len(job.steps) - 1)
                return body

            @app.delete(f"/v1/{path}/{{job_id}}")
            async def cancel(job_id: str) -> dict[str, Any]:
                job = find(kind, job_id)
                if job.body()["status"] in TERMINAL:
                    raise FakeAPIError(409, "job_finished", f"job {job_id} already ended")
                job.steps, job.step = [{"status": "cancelled"}], 0
                return job.body()
        routes()

    @app.get("/v1/evaluations/{job_id}/{name}")
    async def evaluation_file(job_id: str, name: str) -> Response:
        job = find("evaluation", job_id)
        if job.body()["status"] != "succeeded":
            raise FakeAPIError(409, "job_not_finished", f"evaluation {job_id} has not succeeded")
        if name == "curve.png":
            return Response(CURVE, media_type="image/png")
        if name == "results.tsv":
            return Response(f"idx\tlabel\tpredict\n0\t{job_id}\t1\n", media_type="text/tab-separated-values")
        raise FakeAPIError(404, "not_found", f"no {name}")

    @app.get("/v1/models")
    async def models() -> Any:
        listed = list(state.models.values())
        return listed if state.bare_model_list else {"models": listed}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict[str, Any]:
        if name not in state.models:
            raise FakeAPIError(404, "model_not_found", f"no model {name!r}")
        return state.models[name]

    @app.get("/v1/models/{name}/memory")
    async def memory(name: str) -> dict[str, Any]:
        await model(name)
        return {"model": name, "size": 2, "entries": [{"id": "e-1", "prediction": 7, "radius": 0.4}],
                "capacity": 100_000}

    @app.post("/v1/models", status_code=201)
    async def upload(bundle: UploadFile) -> dict[str, Any]:
        data = await bundle.read()
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                files = {name: zf.read(name) for name in zf.namelist()}
            spec = json.loads(files["model.json"])
        except (zipfile.BadZipFile, KeyError, ValueError):
            raise FakeAPIError(422, "invalid_bundle", "not a bundle zip with model.json") from None
        state.uploads.append(files)
        info = spec | {"digest": "sha256:" + hashlib.sha256(data).hexdigest()}
        state.models[spec["name"]] = info
        return info

    @app.delete("/v1/models/{name}")
    async def delete_model(name: str) -> dict[str, Any]:
        if name not in state.models:
            raise FakeAPIError(404, "model_not_found", f"no model {name!r}")
        return state.models.pop(name)

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        if state.ready:
            return JSONResponse({"redis": True, "workers": 1})
        return JSONResponse({"error": {"code": "not_ready", "message": "no worker"}}, 503)

    return app


def sync_transport(app: FastAPI) -> httpx.MockTransport:
    """A transport for the sync `Client` that serves `app` in process: httpx's
    ASGITransport is async only, so each request runs it on a fresh event loop (the fake
    keeps its state in plain objects, bound to no loop)."""
    asgi = httpx.ASGITransport(app=app)

    async def send(request: httpx.Request) -> httpx.Response:
        response = await asgi.handle_async_request(request)
        return httpx.Response(response.status_code, headers=response.headers, content=await response.aread())

    return httpx.MockTransport(lambda request: asyncio.run(send(request)))
