"""What `Client` and `AsyncClient` share: configuration, request building, response parsing,
and the retry policy.

Nothing here talks to the network. Each operation is an `Op`: the keyword arguments of one
`httpx.Client.request` call, the function that turns its response into a typed value (or
raises the matching `APIStatusError`), and whether it is safe to send again. The two clients
only send an `Op`, apply its `parse`, and ask `BaseClient.retry_delay` whether (and when) to
send it again, so sync and async cannot drift apart.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import stat
import threading
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypedDict, TypeVar
from urllib.parse import quote

import httpx

from clients._exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    InputError,
    SmoothcertError,
    _retry_after,
    status_error,
)
from clients._inputs import BundleInput, ImageInput, bundle_zip, encode_input
from clients._types import JobKind, JobStatus, ModelInfo, ModelMemory

__all__ = ["DEFAULT_MAX_RETRIES", "DEFAULT_URL", "EVALUATION_FILES", "MAX_LONG_POLL", "BaseClient",
           "CertifyOptions", "DatasetInput", "EvaluateOptions", "Op", "PredictOptions", "retryable"]

DEFAULT_URL = "http://127.0.0.1:8000"
MAX_LONG_POLL = 30  # seconds: the longest ?wait= the API accepts

# The retry policy (see BaseClient). Backoff before retry k (0, 1, ...): min(0.5·2^k, 8) s
# times a jitter drawn from [0.5, 1), so clients refused together do not come back together.
DEFAULT_MAX_RETRIES = 3
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
MAX_RETRY_AFTER = 60.0  # a longer Retry-After is the server asking us to stop: raise instead
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# Transport failures worth another try: no connection, a dropped one, a timeout. Not a bad
# URL scheme, a proxy refusing, or our own protocol error: those fail the same way again.
_TRANSIENT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)

log = logging.getLogger("smoothcert.client")
_jitter = random.Random()  # its own: never draws from (or shifts) a caller's seeded `random`
_JOB_PATHS: dict[str, str] = {"certification": "/v1/certifications", "prediction": "/v1/predictions",
                              "evaluation": "/v1/evaluations"}
EVALUATION_FILES = ("curve.png", "results.tsv")  # an evaluation's files, served once it succeeded
DatasetInput = str | os.PathLike | bytes | bytearray | memoryview

T = TypeVar("T")


class CertifyOptions(TypedDict, total=False):
    """Optional fields of POST /v1/certifications; those left out (or None) are not sent,
    so the server's defaults apply. `sigma_search` may be "ddrs"/"insta" or a dict with
    `method` and optional `steps`, `lr`, `samples`, `init`. `sampling` is "fixed",
    "adaptive" (n becomes the maximum; `tolerance` in units of σ) or "sequential" (n becomes
    the maximum; sampling stops once the radius reaches `target_radius`, required there)."""

    sigma: float | None
    sigma_search: str | Mapping[str, Any] | None
    bound: str | None
    n0: int | None
    n: int | None
    alpha: float | None
    sampling: str | None
    tolerance: float | None
    target_radius: float | None
    batch_size: int | None
    numeric_mode: str | None
    memory: bool | None
    seed: int | None
    idempotency_key: str | None


class PredictOptions(TypedDict, total=False):
    """Optional fields of POST /v1/predictions (sent only when not None)."""

    sigma: float | None
    n: int | None
    alpha: float | None
    batch_size: int | None
    numeric_mode: str | None
    seed: int | None
    idempotency_key: str | None


class EvaluateOptions(CertifyOptions, total=False):
    """Optional fields of POST /v1/evaluations: a certification's, plus `every` (certify
    examples 0, every, 2·every, ...) and `limit` (at most this many examples)."""

    every: int | None
    limit: int | None


@dataclass(frozen=True)
class Op(Generic[T]):
    """One HTTP exchange: `request` is `httpx.Client.request`'s keyword arguments; `retry`
    says it may be sent again unchanged after a transient failure (a GET, a cancel, a POST
    carrying an Idempotency-Key), i.e. sending it twice has the effect of sending it once."""

    request: dict[str, Any]
    parse: Callable[[httpx.Response], T]
    retry: bool = False


def retryable(error: SmoothcertError) -> bool:
    """Whether `error` may be transient: no connection, a dropped connection or a timeout
    (`APIConnectionError` caused by one), or HTTP 429, 502, 503, 504."""
    if isinstance(error, APIStatusError):
        return error.status_code in RETRY_STATUSES
    return isinstance(error, APIConnectionError) and isinstance(error.__cause__, _TRANSIENT)


def retry_after(error: SmoothcertError) -> float | None:
    """The Retry-After of an error answer (429, 503, any status), in seconds, or None."""
    if not isinstance(error, APIStatusError):
        return None
    return _retry_after(error.response.headers.get("retry-after"))


def job_path(kind: JobKind, job_id: str) -> str:
    if kind not in _JOB_PATHS:
        raise ValueError(f"job kind must be one of {sorted(_JOB_PATHS)}, not {kind!r}")
    return f"{_JOB_PATHS[kind]}/{quote(job_id, safe='')}"


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raise httpx's transport errors as the SDK's (works around `await` too)."""
    try:
        yield
    except httpx.TimeoutException as e:
        raise APITimeoutError(f"request to {_origin(e)} timed out: {e}") from e
    except httpx.TransportError as e:
        raise APIConnectionError(f"cannot reach {_origin(e)}: {e}") from e


def _origin(error: httpx.TransportError) -> str:
    """scheme://host:port of the failed request, so the message says which server."""
    try:
        url = error.request.url
    except RuntimeError:  # httpx raises this when no request is attached
        return "the server"
    return f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}"


def json_body(response: httpx.Response) -> Any:
    """The body of a 2xx response as JSON (None when empty); raise for 4xx/5xx."""
    if response.is_error:
        raise status_error(response)
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        raise SmoothcertError(f"{response.request.method} {response.request.url.path} answered "
                              f"{response.status_code} with a body that is not JSON") from None


def credentials_path() -> Path:
    """The file `smoothcert up` writes its URL and keys to (service/up.py writes the same path)."""
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "smoothcert" / "credentials.json"


def saved_credentials() -> dict[str, str]:
    """{"url", "api_key", ...} left by `smoothcert up`, or {} when there is none."""
    try:
        data = json.loads(credentials_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def resolve_url(base_url: str | None = None) -> str:
    """The server a client talks to: `base_url`, else $SMOOTHCERT_URL, else the URL `up` saved,
    else DEFAULT_URL."""
    return base_url or os.environ.get("SMOOTHCERT_URL") or saved_credentials().get("url") or DEFAULT_URL


def saved_key(base_url: str, *, admin: bool = False) -> str | None:
    """The user key (`admin`: the admin key) `up` saved for the server at `base_url`; None when
    the credentials file names another server (a local key is never sent elsewhere) or has
    no such key (an `up --no-keys` stack needs none)."""
    saved = saved_credentials()
    if saved.get("url") != base_url:
        return None
    return saved.get("admin_key" if admin else "api_key")


class BaseClient:
    """Configuration, the operations of the API and the retry policy; subclasses add sending.

    Retries: an operation that is safe to repeat (GETs, cancels, job submissions, which
    always carry an Idempotency-Key) is sent again after a transient failure (see
    `retryable`), at most `max_retries` times (0: never). Before each retry the client
    waits the server's Retry-After when it sent one (429, 503; one over 60 s is raised at
    once instead), else an exponential backoff with jitter (0.5 s, 1 s, 2 s, ... up to 8 s,
    each times a random factor in [0.5, 1)). The error raised after the last attempt is that
    attempt's. Model uploads and deletions are sent once. `retries` counts every retry this
    client made (thread-safe), including those of `Job.wait`.
    """

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None,
                 timeout: float | None = 30.0, max_retries: int = DEFAULT_MAX_RETRIES):
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int ≥ 0, not {max_retries!r}")
        self.max_retries = max_retries
        self.retries = 0
        self._retries_lock = threading.Lock()
        self.base_url = resolve_url(base_url)
        self.api_key = api_key if api_key is not None else os.environ.get("SMOOTHCERT_API_KEY")
        if self.api_key is None:
            # Only for the server that issued it: a local key is never sent elsewhere.
            self.api_key = saved_key(self.base_url)
        self.timeout = timeout

    def _http_options(self) -> dict[str, Any]:
        """Arguments for the httpx client that both subclasses wrap."""
        headers = {"Accept": "application/json", "User-Agent": "smoothcert-python"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return {"base_url": self.base_url, "headers": headers, "timeout": self.timeout}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def retry_delay(self, op: Op[Any], attempt: int, error: SmoothcertError, *,
                    limit: float | None = None, cap: float = MAX_RETRY_DELAY) -> float | None:
        """Seconds to wait before sending `op` again after `error` ended its attempt number
        `attempt` (0 for the first send), or None to raise `error`. `limit` replaces
        `max_retries` (`Job.wait` passes infinity: it is bounded by its own deadline);
        `cap` bounds the backoff. A Retry-After is waited as given, or raised when over
        MAX_RETRY_AFTER."""
        limit = self.max_retries if limit is None else limit
        if not op.retry or attempt >= limit or not retryable(error):
            return None
        asked = retry_after(error)
        if asked is not None:
            return asked if asked <= MAX_RETRY_AFTER else None
        delay = min(INITIAL_RETRY_DELAY * 2 ** min(attempt, 16), MAX_RETRY_DELAY, cap)
        return delay * _jitter.uniform(0.5, 1.0)

    def note_retry(self, op: Op[Any], attempt: int, error: SmoothcertError, delay: float) -> None:
        """Count (in `retries`) and log a retry that is about to happen."""
        with self._retries_lock:
            self.retries += 1
        log.info("%s %s failed (%s); retry %d in %.2f s", op.request.get("method"), op.request.get("url"),
                 error, attempt + 1, delay)

    # Jobs

    def _submit_op(self, kind: JobKind, image: ImageInput, model: str,
                   options: Mapping[str, Any], allowed: type) -> Op[JobStatus]:
        unknown = set(options) - set(allowed.__annotations__)
        if unknown:  # what Python itself would say for an explicit signature
            raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        fields = {k: v for k, v in options.items() if v is not None and k != "idempotency_key"}
        if isinstance(fields.get("sigma_search"), str):
            fields["sigma_search"] = {"method": fields["sigma_search"]}
        key = options.get("idempotency_key")
        # One key per call, sent on every attempt: the API answers a repeat with the job the
        # first attempt created, so a retried submission never makes a second job.
        headers = {"Idempotency-Key": str(key) if key is not None else new_idempotency_key()}
        body = {"model": model, "input": encode_input(image), **fields}
        return Op({"method": "POST", "url": _JOB_PATHS[kind], "json": body, "headers": headers},
                  lambda r: _parse_submitted(r, kind), retry=True)

    def _evaluate_op(self, dataset: DatasetInput, model: str, options: Mapping[str, Any]) -> Op[JobStatus]:
        unknown = set(options) - set(EvaluateOptions.__annotations__)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        fields = {k: v for k, v in options.items() if v is not None and k != "idempotency_key"}
        # A multipart form (the data set can be tens of MiB: no base64): the server reads each
        # field as JSON where it parses, `model` and a method name as text (docs/api.md).
        form = {"model": model} | {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
        filename, data = dataset_file(dataset)
        key = options.get("idempotency_key")
        headers = {"Idempotency-Key": str(key) if key is not None else new_idempotency_key()}
        return Op({"method": "POST", "url": _JOB_PATHS["evaluation"], "data": form, "headers": headers,
                   "files": {"dataset": (filename, data, "application/octet-stream")}},
                  lambda r: _parse_submitted(r, "evaluation"), retry=True)

    def _evaluation_file_op(self, job_id: str, name: str) -> Op[bytes]:
        if name not in EVALUATION_FILES:
            raise ValueError(f"an evaluation's files are {', '.join(EVALUATION_FILES)}, not {name!r}")

        def parse(r: httpx.Response) -> bytes:
            if r.is_error:
                raise status_error(r)
            return r.content
        return Op({"method": "GET", "url": f"{job_path('evaluation', job_id)}/{name}",
                   "headers": {"Accept": "*/*"}}, parse, retry=True)

    def _status_op(self, kind: JobKind, job_id: str, wait: int | None = None) -> Op[JobStatus]:
        request: dict[str, Any] = {"method": "GET", "url": job_path(kind, job_id)}
        if wait:
            wait = min(int(wait), MAX_LONG_POLL)
            request["params"] = {"wait": wait}
            if self.timeout is not None:  # the server may hold the answer for `wait` seconds
                request["timeout"] = self.timeout + wait
        return Op(request, lambda r: JobStatus.from_json(json_body(r), kind, job_id), retry=True)

    def _cancel_op(self, kind: JobKind, job_id: str) -> Op[JobStatus | None]:
        def parse(r: httpx.Response) -> JobStatus | None:
            body = json_body(r)
            return JobStatus.from_json(body, kind, job_id) if isinstance(body, Mapping) else None
        # Cancelling twice is cancelling once (the API answers the status either way).
        return Op({"method": "DELETE", "url": job_path(kind, job_id)}, parse, retry=True)

    # Registry and health

    def _models_op(self) -> Op[list[ModelInfo]]:
        return Op({"method": "GET", "url": "/v1/models"}, _parse_models, retry=True)

    def _model_op(self, name: str) -> Op[ModelInfo]:
        return Op({"method": "GET", "url": f"/v1/models/{quote(name, safe='')}"},
                  lambda r: ModelInfo.from_json(json_body(r)), retry=True)

    def _model_memory_op(self, name: str) -> Op[ModelMemory]:
        return Op({"method": "GET", "url": f"/v1/models/{quote(name, safe='')}/memory"},
                  lambda r: ModelMemory.from_json(json_body(r)), retry=True)

    def _reset_model_memory_op(self, name: str) -> Op[ModelMemory]:
        return Op({"method": "DELETE", "url": f"/v1/models/{quote(name, safe='')}/memory"},
                  lambda r: ModelMemory.from_json(json_body(r)))

    def _upload_model_op(self, bundle: BundleInput) -> Op[ModelInfo]:
        filename, data = bundle_zip(bundle)
        files = {"bundle": (filename, data, "application/zip")}
        return Op({"method": "POST", "url": "/v1/models", "files": files},
                  lambda r: ModelInfo.from_json(json_body(r)))

    def _delete_model_op(self, name: str) -> Op[ModelInfo]:
        return Op({"method": "DELETE", "url": f"/v1/models/{quote(name, safe='')}"},
                  lambda r: ModelInfo.from_json(json_body(r)))

    def _health_op(self) -> Op[dict[str, Any]]:
        # A 503 here is the answer "not ready" (parsed, so not retried); no answer at all is.
        return Op({"method": "GET", "url": "/v2/health/ready"}, _parse_health, retry=True)


def dataset_file(source: DatasetInput) -> tuple[str, bytes]:
    """(filename, bytes) of an evaluation's data set: an .npz or .zip file, its bytes, or a
    directory of class folders (`<label>/<image>`), zipped in memory with its relative paths
    (dot-files skipped, sorted, fixed timestamps: the same folder gives the same bytes).
    Nothing is validated beyond that: the server checks it against the model."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        try:  # an .npz is a zip of .npy members; the server tells them apart the same way
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/")]
            npz = bool(names) and all(n.endswith(".npy") for n in names)
        except zipfile.BadZipFile:
            npz = True  # the server answers what it is not
        return ("dataset.npz" if npz else "dataset.zip"), data
    path = os.fspath(source)
    if os.path.isdir(path):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise InputError(f"data set directory {path!r} holds no files")
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
            for file in files:
                info = zipfile.ZipInfo(file.relative_to(path).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                zf.writestr(info, file.read_bytes())
        return f"{Path(path).resolve().name or 'dataset'}.zip", out.getvalue()
    try:
        with open(path, "rb") as fh:
            return os.path.basename(path), fh.read()
    except OSError as e:
        raise InputError(f"cannot read data set {path!r}: {e.strerror or e}") from None


def new_idempotency_key() -> str:
    """A fresh Idempotency-Key for a submission that was not given one."""
    return f"smoothcert-python-{uuid.uuid4().hex}"


def _parse_submitted(response: httpx.Response, kind: JobKind) -> JobStatus:
    body = json_body(response)
    # The id is in the body; the Location header (…/{id}) is the fallback.
    location = response.headers.get("location", "")
    status = JobStatus.from_json(body, kind, location.rstrip("/").rsplit("/", 1)[-1])
    if not status.id:
        raise SmoothcertError(f"the server accepted the job but named no id (HTTP {response.status_code})")
    return status


def _parse_models(response: httpx.Response) -> list[ModelInfo]:
    body = json_body(response)
    if isinstance(body, Mapping):  # {"models": [...]}, or a paginated {"data"/"items": [...]}
        body = next((body[k] for k in ("models", "data", "items") if isinstance(body.get(k), list)), [])
    return [ModelInfo.from_json(m) for m in body or ()]


def _parse_health(response: httpx.Response) -> dict[str, Any]:
    """{"ready": bool, ...the server's body}; 503 means "not ready", not an error."""
    if response.status_code == 503:
        try:
            body = response.json()
        except ValueError:
            body = None
        return {**(body if isinstance(body, dict) else {}), "ready": False}
    body = json_body(response)
    return {"ready": True, **(body if isinstance(body, dict) else {})}
