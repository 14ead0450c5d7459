"""`Client` and `AsyncClient`: the same API, blocking or awaitable.

Each method builds an `Op` in `BaseClient` and sends it, again after a transient failure
when `BaseClient.retry_delay` says so; nothing else happens here. Both accept a `transport`
(e.g. `httpx.MockTransport`, `httpx.ASGITransport`) so tests can run the SDK against an
in-process app.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

import httpx

from clients._base import (
    DEFAULT_MAX_RETRIES,
    BaseClient,
    CertifyOptions,
    DatasetInput,
    EvaluateOptions,
    Op,
    PredictOptions,
    translate_errors,
)
from clients._exceptions import APIConnectionError, APIStatusError
from clients._inputs import BundleInput, ImageInput
from clients._jobs import AsyncJob, Job
from clients._types import JobKind, JobStatus, ModelInfo, ModelMemory

__all__ = ["AsyncClient", "Client"]

T = TypeVar("T")


class Client(BaseClient):
    """A blocking client for the smoothcert HTTP API.

    `base_url` defaults to $SMOOTHCERT_URL, then http://127.0.0.1:8000; `api_key` to
    $SMOOTHCERT_API_KEY (sent as `Authorization: Bearer`). `timeout` is per attempt, in
    seconds (None: none); long-polls add their wait to it. Use as a context manager, or
    call `close()`.

    `max_retries` (default 3; 0: never) is how often a request that is safe to repeat is
    sent again after a connection error, a timeout, or HTTP 429/502/503/504, waiting the
    server's Retry-After or an exponential backoff with jitter in between (`BaseClient`
    has the policy). Submissions carry an Idempotency-Key (`idempotency_key`, or a fresh
    one per call), so a retried submission returns the job the first attempt made.
    `Job.wait` rides out a longer outage, such as an API restart, up to its own timeout.
    """

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None,
                 timeout: float | None = 30.0, max_retries: int = DEFAULT_MAX_RETRIES,
                 transport: httpx.BaseTransport | None = None):
        super().__init__(base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self._http = httpx.Client(transport=transport, **self._http_options())

    def _run(self, op: Op[T], *, retries: int | None = None) -> T:
        """Send `op` and parse its answer, retrying as `retry_delay` decides (`retries`
        replaces `max_retries`)."""
        for attempt in itertools.count():
            try:
                with translate_errors():
                    response = self._http.request(**op.request)
                return op.parse(response)
            except (APIConnectionError, APIStatusError) as error:
                delay = self.retry_delay(op, attempt, error, limit=retries)
                if delay is None:
                    raise
                self.note_retry(op, attempt, error, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def certify(self, image: ImageInput, *, model: str, **options: Unpack[CertifyOptions]) -> Job:
        """Submit a certification of `image` with `model`; returns its `Job` at once.

        `image`: a path (.png/.jpg/.jpeg/.npy), PNG/JPEG/.npy bytes, a numpy array, or a
        nested list in [0, 1]. Options (`sigma`, `sigma_search`, `bound`, `n0`, `n`, `alpha`,
        `sampling`, `tolerance`, `target_radius`, `batch_size`, `numeric_mode`, `memory`,
        `seed`) are sent only when not None. `idempotency_key` makes a repeated call return
        the same job; without one the client makes up a key for this call, so its own retries
        never make two jobs.
        """
        op = self._submit_op("certification", image, model, options, CertifyOptions)
        return self._job(self._run(op), "certification")

    def predict(self, image: ImageInput, *, model: str, **options: Unpack[PredictOptions]) -> Job:
        """Submit a smoothed prediction (no radius); options as for `certify`."""
        op = self._submit_op("prediction", image, model, options, PredictOptions)
        return self._job(self._run(op), "prediction")

    def evaluate(self, dataset: DatasetInput, *, model: str, **options: Unpack[EvaluateOptions]) -> Job:
        """Submit an evaluation: certify every `every`-th example of `dataset` (an .npz with x
        and y, a zip of class folders, a directory of class folders, or their bytes) with
        `model`, in order; returns its `Job` at once. Its result is the run's summary
        (`EvaluationResult`); `evaluation_file` fetches curve.png and results.tsv once it
        has succeeded. Options as for `certify`, plus `every` and `limit`."""
        op = self._evaluate_op(dataset, model, options)
        return self._job(self._run(op), "evaluation")

    def evaluation_file(self, job_id: str, name: str) -> bytes:
        """A succeeded evaluation's "curve.png" or "results.tsv" (`ConflictError` before it
        has succeeded)."""
        return self._run(self._evaluation_file_op(job_id, name))

    def job(self, id: str, kind: JobKind = "certification") -> Job:
        """A handle on an existing job by id (nothing is sent)."""
        return Job(self, id, kind)

    def _job(self, submitted: JobStatus, kind: JobKind) -> Job:
        return Job(self, submitted.id, kind, submitted)

    def models(self) -> list[ModelInfo]:
        """The registered models."""
        return self._run(self._models_op())

    def model(self, name: str) -> ModelInfo:
        """One registered model; `NotFoundError` if there is none by that name."""
        return self._run(self._model_op(name))

    def model_memory(self, name: str) -> ModelMemory:
        """The size and entries of a model's certificate memory."""
        return self._run(self._model_memory_op(name))

    def reset_model_memory(self, name: str) -> ModelMemory:
        """Drop every entry of every memory of the model and the keys' commit counts (admin key)."""
        return self._run(self._reset_model_memory_op(name))

    def upload_model(self, bundle: BundleInput) -> ModelInfo:
        """Register a bundle: a directory (zipped in memory), a .zip path, or zip bytes."""
        return self._run(self._upload_model_op(bundle))

    def delete_model(self, name: str) -> ModelInfo:
        """Unregister a model (admin key); returns what it was. `NotFoundError` if there is none."""
        return self._run(self._delete_model_op(name))

    def health(self) -> dict[str, Any]:
        """GET /v2/health/ready as a dict whose "ready" is a bool (503 gives False)."""
        return self._run(self._health_op())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncClient(BaseClient):
    """`Client` for asyncio: the same constructor, methods and retry policy, awaitable."""

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None,
                 timeout: float | None = 30.0, max_retries: int = DEFAULT_MAX_RETRIES,
                 transport: httpx.AsyncBaseTransport | None = None):
        super().__init__(base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self._http = httpx.AsyncClient(transport=transport, **self._http_options())

    async def _run(self, op: Op[T], *, retries: int | None = None) -> T:
        """See `Client._run`."""
        for attempt in itertools.count():
            try:
                with translate_errors():
                    response = await self._http.request(**op.request)
                return op.parse(response)
            except (APIConnectionError, APIStatusError) as error:
                delay = self.retry_delay(op, attempt, error, limit=retries)
                if delay is None:
                    raise
                self.note_retry(op, attempt, error, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def certify(self, image: ImageInput, *, model: str,
                      **options: Unpack[CertifyOptions]) -> AsyncJob:
        """See `Client.certify`."""
        op = self._submit_op("certification", image, model, options, CertifyOptions)
        return self._job(await self._run(op), "certification")

    async def predict(self, image: ImageInput, *, model: str,
                      **options: Unpack[PredictOptions]) -> AsyncJob:
        """See `Client.predict`."""
        op = self._submit_op("prediction", image, model, options, PredictOptions)
        return self._job(await self._run(op), "prediction")

    async def evaluate(self, dataset: DatasetInput, *, model: str,
                       **options: Unpack[EvaluateOptions]) -> AsyncJob:
        """See `Client.evaluate`."""
        op = self._evaluate_op(dataset, model, options)
        return self._job(await self._run(op), "evaluation")

    async def evaluation_file(self, job_id: str, name: str) -> bytes:
        """See `Client.evaluation_file`."""
        return await self._run(self._evaluation_file_op(job_id, name))

    def job(self, id: str, kind: JobKind = "certification") -> AsyncJob:
        """A handle on an existing job by id (nothing is sent)."""
        return AsyncJob(self, id, kind)

    def _job(self, submitted: JobStatus, kind: JobKind) -> AsyncJob:
        return AsyncJob(self, submitted.id, kind, submitted)

    async def models(self) -> list[ModelInfo]:
        """See `Client.models`."""
        return await self._run(self._models_op())

    async def model(self, name: str) -> ModelInfo:
        """See `Client.model`."""
        return await self._run(self._model_op(name))

    async def model_memory(self, name: str) -> ModelMemory:
        """See `Client.model_memory`."""
        return await self._run(self._model_memory_op(name))

    async def reset_model_memory(self, name: str) -> ModelMemory:
        """See `Client.reset_model_memory`."""
        return await self._run(self._reset_model_memory_op(name))

    async def upload_model(self, bundle: BundleInput) -> ModelInfo:
        """See `Client.upload_model`."""
        return await self._run(self._upload_model_op(bundle))

    async def delete_model(self, name: str) -> ModelInfo:
        """See `Client.delete_model`."""
        return await self._run(self._delete_model_op(name))

    async def health(self) -> dict[str, Any]:
        """See `Client.health`."""
        return await self._run(self._health_op())

    async def close(self) -> None:
        await self._http.aclose()

    aclose = close  # httpx's spelling

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
