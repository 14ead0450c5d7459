"""One job, start to end: the plain functions the thin Celery tasks call (tests call them
directly).

Guarantees of `run_job`:
- a job that has already ended (a redelivered task, a cancel while queued) is not run again;
- the job ends exactly once (the store's compare-and-set), with the result in docs/api.md's
  shape or an error `{"code", "message"}`: invalid_request, bad_model, memory_full,
  memory_quota, memory_unavailable (Redis would not keep a commit: service.durability),
  remote_error, remote_unavailable, remote_changed (a remote model: smoothcert.remote),
  time_limit, internal (traceback logged, never sent), or cancelled; a Redis outage that
  outlasts the store's retries is raised, the job left unended for redelivery;
- a cancel flag stops the engine within one batch; progress is written at most
  4 times a second, and exactly (the samples the job did) when it stops on a cancel or
  its time limit; a succeeded job's progress ends full (done = total); while the worker
  loads a model it has not cached (a job's first on it: loading, batch-size probe,
  compilation) the job's stage is "loading".
"""

from __future__ import annotations

import dataclasses
import io
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
from celery.exceptions import SoftTimeLimitExceeded

from service.config import Settings
from service.durability import MemoryUnavailable
from service.store import JobRecord, Store
from smoothcert.bounds import InvalidParameters
from smoothcert.bundle import BundleError
from smoothcert.data import Dataset
from smoothcert.evaluation import EvaluationRun, evaluate, write_run
from smoothcert.guarantees import guarantee
from smoothcert.memory import MemoryFull
from smoothcert.remote import RemoteChanged, RemoteError, RemoteUnavailable
from smoothcert.results import Certificate, Prediction, SelectorRecord
from smoothcert.sampling import Cancelled
from smoothcert.search import SigmaSearch
from workers.runtime import LoadedModel, ModelRuntime
from workers.shared_memory import MemoryQuota

log = logging.getLogger(__name__)

CANCELLED = {"code": "cancelled", "message": "cancelled by the client"}


@dataclass(frozen=True)
class Answer:
    """What a finished job spent and whether it abstained (for the metrics)."""

    samples: int
    seconds: float
    abstained: bool


class ProgressWriter:
    """The engine's progress callback, writing to the job at most once per `interval` s
    (the first call always: a client sees the job move at once); `flush` writes the latest
    call's values, so a job that stops early shows exactly the samples it did; `finish`
    writes them as a finished stage, so a succeeded job's progress ends full."""

    def __init__(self, store: Store, job_id: str, interval: float = 0.25):
        self.store, self.job_id, self.interval = store, job_id, interval
        self._last = -float("inf")
        self._latest: tuple[str, int, int] | None = None
        self._written: tuple[str, int, int] | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        self._latest = (stage, done, total)
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._write()

    def now(self, stage: str, done: int, total: int) -> None:
        """Record and write at once, unthrottled (a stage that must be seen, such as memory)."""
        self._latest = (stage, done, total)
        self._last = time.monotonic()
        self._write()

    def flush(self) -> None:
        if self._latest is not None and self._latest != self._written:
            self._write()

    def finish(self) -> None:
        """Write the last stage as complete, `done` of `done` (writes are throttled, so the last
        one written may lag behind the work). When sampling stopped early (sequential) the total
        shrinks to the samples drawn: it never claims samples that were not drawn."""
        if self._latest is not None:
            stage, done, _ = self._latest
            self._latest = (stage, done, done)
            self.flush()

    def _write(self) -> None:
        self._written = self._latest
        self.store.set_progress(self.job_id, *self._latest)


def load_input(store: Store, job_id: str) -> np.ndarray:
    """The job's input: a float32 .npy array (never unpickled)."""
    raw = store.get_input(job_id)
    if raw is None:
        raise InvalidParameters("the job's input has expired or was never stored")
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False).astype(np.float32, copy=False)
    except (ValueError, OSError, EOFError) as e:
        raise InvalidParameters(f"the job's input is not a .npy array ({e})") from None


def sigma_search_of(spec: dict | None) -> SigmaSearch | None:
    if spec is None:
        return None
    known = {f.name for f in dataclasses.fields(SigmaSearch)}
    if unknown := sorted(set(spec) - known):
        raise InvalidParameters(f"sigma_search has unknown key(s) {unknown}")
    return SigmaSearch(**spec)


def _present(request: dict, *keys: str) -> dict[str, Any]:
    return {k: request[k] for k in keys if request.get(k) is not None}


# The estimator stage's own answer, as a σ selector's result shows it (docs/api.md).
_ESTIMATOR_FIELDS = ("prediction", "radius", "sigma", "bound", "n0", "n", "alpha", "sampling", "look_alpha",
                     "n_a", "p_a_lower", "p_b_upper", "runner_up", "noise_sigma", "noise_tail",
                     "n1", "n2", "p_value", "seed", "samples")


def selector_result(record: SelectorRecord | None) -> dict | None:
    """A σ selector's two stages (smoothcert.selector) as plain data; None for other models."""
    if record is None:
        return None
    out = dataclasses.asdict(record)
    estimator = out.pop("estimator")
    out["sigmas"] = list(record.sigmas)
    out["estimator"] = {k: estimator[k] for k in _ESTIMATOR_FIELDS if k in estimator}
    return out


def _label(model: LoadedModel, prediction: int | None) -> str | None:
    return None if prediction is None else model.certifier.spec.labels[prediction]


def _index(value: int | None) -> str | None:
    return None if value is None else str(value)


def certification_result(cert: Certificate, job: JobRecord, model: LoadedModel, memory: bool) -> dict:
    """docs/api.md's result: the certificate and every field that makes it auditable. An
    answer of the memory reports its root's sampling (σ, bound, n0, n, α, bounds) and names
    the root entry and job; `guarantee` says in words what it promises."""
    m = cert.memory
    record = {"used": False}
    if memory and m is not None:
        record = {"used": True, "outcome": m.outcome, "namespace": m.namespace,
                  "entry": _index(m.entry),  # the entry this job committed (None: answered from the memory)
                  "conflict": _index(m.conflict),  # the entry that decided "inside"/"shrunk", or whose ball answered
                  "root": _index(m.root), "root_job": m.root_job,  # the entry whose own sampling produced the ball
                  "prediction_before": m.prediction_before, "radius_before": m.radius_before,
                  "sigma_before": m.sigma_before}
    seed_source = job.request.get("seed_source", cert.seed_source)
    return {
        "prediction": cert.prediction, "label": _label(model, cert.prediction),
        "abstained": cert.abstained, "radius": cert.radius, "sigma": cert.sigma,
        "p_a_lower": cert.p_a_lower, "bound": cert.bound, "n0": cert.n0, "n": cert.n,
        "alpha": cert.alpha, "sampling": cert.sampling, "n_max": cert.n_max, "tolerance": cert.tolerance,
        "target_radius": cert.target_radius, "look_alpha": cert.look_alpha, "n_a": cert.n_a,
        "memory": record,
        "guarantee": guarantee(cert, memory=memory, seed_source=seed_source),
        "model": {"name": job.model, "digest": cert.model_digest or job.digest},
        "input_sha256": job.request.get("input_sha256"),  # the decoded tensor the API stored
        "seed": cert.seed, "seed_source": seed_source, "numeric_mode": cert.numeric_mode,
        "batch_size": cert.batch_size, "p_b_upper": cert.p_b_upper,
        "p_a_lower_halves": list(cert.p_a_lower_halves) if cert.p_a_lower_halves else None,
        "n_a_halves": list(cert.n_a_halves) if cert.n_a_halves else None,
        "noise_sigma": cert.noise_sigma, "noise_tail": cert.noise_tail,
        "remote": dataclasses.asdict(cert.remote) if cert.remote else None,
        "search": dataclasses.asdict(cert.search) if cert.search else None,
        "selector": selector_result(cert.selector),
        "samples": cert.samples, "seconds": cert.seconds,
    }


def prediction_result(pred: Prediction, job: JobRecord, model: LoadedModel) -> dict:
    return {
        "prediction": pred.prediction, "label": _label(model, pred.prediction),
        "abstained": pred.abstained, "n": pred.n, "alpha": pred.alpha, "sigma": pred.sigma,
        "p_value": pred.p_value, "counts": [pred.n1, pred.n2], "seed": pred.seed,
        "seed_source": job.request.get("seed_source", pred.seed_source),
        "model": {"name": job.model, "digest": pred.model_digest or job.digest},
        "numeric_mode": pred.numeric_mode, "batch_size": pred.batch_size,
        "remote": dataclasses.asdict(pred.remote) if pred.remote else None,
        "selector": selector_result(pred.selector),
        "samples": pred.samples, "seconds": pred.seconds,
    }


class EvaluationProgress:
    """An evaluation's progress as the job shows it: stage "evaluation", examples done of
    the examples to certify (the samples of each example are not shown)."""

    def __init__(self, store: Store, job_id: str, total: int):
        self.store, self.job_id, self.total, self.done = store, job_id, total, 0
        store.set_progress(job_id, "evaluation", 0, total)

    def stage(self, stage: str, done: int, total: int) -> None:
        pass

    def advance(self, note: str = "") -> None:
        self.done += 1
        self.store.set_progress(self.job_id, "evaluation", self.done, self.total)


def run_evaluation(store: Store, model: LoadedModel, job: JobRecord,
                   cancel: Callable[[], bool]) -> tuple[dict, EvaluationRun]:
    """Evaluate the uploaded dataset (a fresh memory of its own when asked: an evaluation
    measures the model and never writes the shared memory); store results.tsv and curve.png
    beside the job; the summary is the result."""
    with np.load(io.BytesIO(store.get_input(job.id)), allow_pickle=False) as data:
        dataset = Dataset(data["x"], data["y"], model.certifier.spec.labels, f"upload:{job.id}", "test")
    req = job.request
    total = len(range(0, len(dataset), req["every"])[:req["limit"]])
    run = evaluate(
        model.certifier, dataset, every=req["every"], limit=req["limit"],
        sigma_search=sigma_search_of(req.get("sigma_search")), memory=bool(req["memory"]),
        progress=EvaluationProgress(store, job.id, total), cancel=cancel,
        **_present(req, "sigma", "bound", "n0", "n", "alpha", "sampling", "tolerance",
                   "target_radius", "batch_size", "seed"),
    )
    with tempfile.TemporaryDirectory() as folder:
        summary = write_run(folder, run)
        for name in ("curve.png", "results.tsv"):
            store.put_artifact(job.id, name, (Path(folder) / name).read_bytes())
    return summary, run


class JobTimeLimit(Exception):
    """Raised between batches once a job has run past the job time limit."""


def cancel_check(store: Store, job_id: str, deadline: float) -> Callable[[], bool]:
    """The engine's cancel check for a job: True once a cancel is requested; raises
    JobTimeLimit past `deadline` (time.monotonic). Works in every pool, threads included,
    where Celery's own time limits do not."""
    def check() -> bool:
        if time.monotonic() > deadline:
            raise JobTimeLimit()
        return store.cancel_requested(job_id)
    return check


def execute(store: Store, runtime: ModelRuntime, job: JobRecord,
            cancel: Callable[[], bool] | None = None,
            progress: ProgressWriter | None = None) -> tuple[dict, Answer]:
    """Run the engine for a started job; raises what `run_job` turns into errors."""
    cancel = cancel or (lambda: store.cancel_requested(job.id))
    mode = job.request.get("numeric_mode")
    if not runtime.cached(job.digest, mode):
        # A model's first job on a worker pays its load and batch-size probe (several times
        # the job itself on a small model): say so, rather than show a job stuck at nothing.
        store.set_progress(job.id, "loading", 0, 0)
    model = runtime.get(job.digest, mode)
    if job.kind == "evaluation":
        summary, run = run_evaluation(store, model, job, cancel)
        spent = Answer(sum(r.certificate.samples for r in run.rows),
                       sum(r.certificate.seconds for r in run.rows), False)
        return summary, spent
    x = load_input(store, job.id)
    progress = progress or ProgressWriter(store, job.id)
    common = {"progress": progress, "cancel": cancel}
    req = job.request
    if job.kind == "prediction":
        pred = model.predict(x, **_present(req, "sigma", "n", "alpha", "batch_size", "seed"), **common)
        return prediction_result(pred, job, model), Answer(pred.samples, pred.seconds, pred.abstained)
    memory = bool(req.get("memory", False))
    cert = model.certify(
        x, job.id, memory=memory, owner=job.owner,
        on_commit=lambda spent: progress.now("memory", spent, spent),
        sigma_search=sigma_search_of(req.get("sigma_search")),
        **_present(req, "sigma", "bound", "n0", "n", "alpha", "sampling", "tolerance",
                   "target_radius", "batch_size", "seed"), **common,
    )
    return certification_result(cert, job, model, memory), Answer(cert.samples, cert.seconds, cert.abstained)


def run_job(store: Store, runtime: ModelRuntime, job_id: str, settings: Settings) -> str | None:
    """Run one job to its end; returns its final status (None: no such job)."""
    status = store.start_job(job_id)
    if status != "running":
        return status  # ended already, or expired: never run twice
    job = store.get_job(job_id)
    if job is None:
        return None
    error: dict | None = None
    deadline = time.monotonic() + settings.job_time_limit_seconds
    progress = ProgressWriter(store, job_id)
    try:
        result, answer = execute(store, runtime, job, cancel_check(store, job_id, deadline), progress)
    except Cancelled:
        progress.flush()  # the samples done when the cancel was seen, before the job ends
        store.finish_job(job_id, "cancelled", error=CANCELLED)
        return _status(store, job_id)
    except InvalidParameters as e:
        error = {"code": "invalid_request", "message": str(e)}
    except RemoteError as e:  # before BundleError, which it is: the served model, not the bundle
        error = {"code": "remote_error", "message": str(e)}
    except RemoteUnavailable as e:
        error = {"code": "remote_unavailable", "message": str(e)}
    except RemoteChanged as e:
        error = {"code": "remote_changed", "message": str(e)}
    except BundleError as e:
        error = {"code": "bad_model", "message": str(e)}
    except MemoryFull as e:
        error = {"code": "memory_full", "message": str(e)}
    except MemoryQuota as e:
        error = {"code": "memory_quota", "message": str(e)}
    except MemoryUnavailable as e:
        error = {"code": "memory_unavailable", "message": str(e)}
    except (SoftTimeLimitExceeded, JobTimeLimit):
        progress.flush()
        error = {"code": "time_limit",
                 "message": f"the job ran longer than {settings.job_time_limit_seconds} s"}
    except (redis.ConnectionError, redis.TimeoutError):
        # Redis stayed away longer than the store retries: the job is neither done nor
        # failed. Leave it as it is (running) for the task to hand back to the broker.
        log.warning("job %s paused: Redis unreachable past the retries; left for redelivery", job_id)
        raise
    except Exception:
        log.exception("job %s failed", job_id)
        error = {"code": "internal",
                 "message": f"the worker failed unexpectedly; the error is logged under job {job_id}"}
    if error is not None:
        store.finish_job(job_id, "failed", error=error)
    else:
        store.count("samples_total", answer.samples)
        store.count("engine_seconds_total", answer.seconds)
        # answered_total counts every answer; abstained_total the abstentions among them.
        # Counted by the finish itself, so a worker dying right after it loses no count.
        counters = [f"answered_total:{job.kind}"] + ([f"abstained_total:{job.kind}"] if answer.abstained else [])
        progress.finish()  # before the end: progress is written only while the job runs
        store.finish_job(job_id, "succeeded", result=result, counters=counters)
    return _status(store, job_id)


def _status(store: Store, job_id: str) -> str | None:
    job = store.get_job(job_id)
    return job.status if job is not None else None
