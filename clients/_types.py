"""Typed, frozen views of the server's JSON (docs/api.md).

Parsing is lenient so that a newer server never breaks an older client: unknown keys are
kept in `extra` (or `raw`), missing keys read as None, and a field of an unexpected shape
is kept as sent rather than refused. Only the SDK builds these; users read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from clients._exceptions import JobFailed

__all__ = [
    "TERMINAL",
    "CertificateResult",
    "ErrorInfo",
    "EvaluationResult",
    "JobKind",
    "JobStatus",
    "MemoryInfo",
    "ModelInfo",
    "ModelMemory",
    "ModelRef",
    "PredictionResult",
    "Progress",
]

JobKind = Literal["certification", "prediction", "evaluation"]
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


def _split(cls: type, data: Mapping[str, Any]) -> tuple[dict, dict]:
    """(known, extra): the keys that are fields of `cls`, and all the others."""
    names = {f.name for f in fields(cls)} - {"extra", "raw"}
    known = {k: v for k, v in data.items() if k in names}
    return known, {k: v for k, v in data.items() if k not in names}


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class Progress:
    """How far a running job is: `stage` is sigma_search, selection, estimation or memory
    (an evaluation: evaluation, counting examples); loading while the worker loads the model
    (its first job there: loading and measuring its batch size; no counts)."""

    stage: str | None = None
    samples_done: int = 0
    samples_total: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float | None:
        """samples_done / samples_total in [0, 1], or None when the total is unknown."""
        try:
            return min(max(self.samples_done / self.samples_total, 0.0), 1.0)
        except (TypeError, ZeroDivisionError):
            return None

    @classmethod
    def from_json(cls, data: Any) -> Progress | None:
        if not isinstance(data, Mapping):
            return None
        known, extra = _split(cls, data)
        return cls(**known, extra=extra)


@dataclass(frozen=True)
class MemoryInfo:
    """What the certificate memory did: outcome is new, inside or shrunk. `root` and
    `root_job` name the entry whose own sampling produced the ball (the result's σ, n, α
    and bounds are that entry's); `entry` is the one this job committed (None: answered from
    the memory without sampling)."""

    used: bool | None = None
    outcome: str | None = None
    namespace: str | None = None
    entry: Any = None
    conflict: Any = None
    root: Any = None
    root_job: str | None = None
    prediction_before: int | None = None
    radius_before: float | None = None
    sigma_before: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> MemoryInfo | None:
        if isinstance(data, bool):  # a terse server may answer "memory": false
            return cls(used=data)
        if not isinstance(data, Mapping):
            return None
        known, extra = _split(cls, data)
        return cls(**known, extra=extra)


@dataclass(frozen=True)
class ModelRef:
    """The model a result came from, by name and content digest ("sha256:...")."""

    name: str | None = None
    digest: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> ModelRef | None:
        if isinstance(data, str):
            return cls(name=data)
        if not isinstance(data, Mapping):
            return None
        known, extra = _split(cls, data)
        return cls(**known, extra=extra)


@dataclass(frozen=True)
class CertificateResult:
    """A certified prediction: class and ℓ2 radius, or an abstention (`prediction` None)."""

    prediction: int | None = None
    label: str | None = None
    abstained: bool = False
    radius: float | None = None
    sigma: float | None = None
    p_a_lower: float | None = None
    bound: str | None = None
    n0: int | None = None
    n: int | None = None  # estimation samples the bound used (adaptive, sequential: ≤ n_max)
    alpha: float | None = None
    sampling: str | None = None  # "fixed", "adaptive" or "sequential"
    n_max: int | None = None  # the request's n
    tolerance: float | None = None  # adaptive: expected radius loss allowed, in units of σ
    target_radius: float | None = None  # sequential: the radius at which sampling stops
    look_alpha: float | None = None  # sequential: the level (a share of alpha) of the look whose bound is given
    memory: MemoryInfo | None = None
    guarantee: dict[str, str] | None = None  # {"scope", "statement"}: what the certificate promises, in words
    seed: int | None = None
    seed_source: str | None = None  # "server" (drawn by the service) or "caller" (a caller's seed guarantees nothing)
    remote: dict[str, Any] | None = None  # a remote model: {endpoint, model, version, canary_digest}
    # a σ selector's two stages: {sigmas, sigma_e, sigma_index, radius_sigma, radius_class, alpha_sigma,
    # alpha_class, classifier_seed, estimator} (docs/api.md); None for other models
    selector: dict[str, Any] | None = None
    model: ModelRef | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CertificateResult:
        known, extra = _split(cls, data)
        known.setdefault("abstained", known.get("prediction") is None)
        known["memory"] = MemoryInfo.from_json(known.get("memory"))
        known["model"] = ModelRef.from_json(known.get("model"))
        return cls(**known, extra=extra)


@dataclass(frozen=True)
class PredictionResult:
    """PREDICT's answer: the smoothed class, or an abstention (`prediction` None); no radius."""

    prediction: int | None = None
    label: str | None = None
    abstained: bool = False
    sigma: float | None = None
    n: int | None = None
    alpha: float | None = None
    selector: dict[str, Any] | None = None  # a σ selector's two stages (no radii)
    model: ModelRef | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PredictionResult:
        known, extra = _split(cls, data)
        known.setdefault("abstained", known.get("prediction") is None)
        known["model"] = ModelRef.from_json(known.get("model"))
        return cls(**known, extra=extra)


@dataclass(frozen=True)
class EvaluationResult:
    """An evaluation's summary (schema smoothcert.evaluation/1, docs/api.md): `count`
    examples, `clean_accuracy`, `acr`, `abstention_rate`, `certified_accuracy` as
    [{"radius", "accuracy", "count"}], σ, seconds and samples per example, the memory's
    outcomes, and the `parameters` the run used. Exact floats, never rounded."""

    count: int | None = None
    clean_accuracy: float | None = None
    acr: float | None = None
    abstention_rate: float | None = None
    certified_accuracy: tuple[dict[str, Any], ...] | None = None
    sigma: dict[str, Any] | None = None
    seconds: dict[str, Any] | None = None
    samples: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    parameters: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EvaluationResult:
        known, extra = _split(cls, data)
        known["certified_accuracy"] = _tuple(known.get("certified_accuracy"))
        return cls(**known, extra=extra)


@dataclass(frozen=True)
class ErrorInfo:
    """Why a job failed, as the server said it."""

    code: str | None = None
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> ErrorInfo | None:
        if data is None:
            return None
        if not isinstance(data, Mapping):
            return cls(message=str(data))
        known, extra = _split(cls, data)
        return cls(code=known.get("code"), message=str(known.get("message") or ""), extra=extra)


@dataclass(frozen=True)
class JobStatus:
    """One snapshot of a job. `raw` is the body exactly as the server sent it."""

    id: str
    status: str
    progress: Progress | None = None
    result: CertificateResult | PredictionResult | EvaluationResult | None = None
    error: ErrorInfo | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def done(self) -> bool:
        """True once the job is succeeded, failed or cancelled: it will not change again."""
        return self.status in TERMINAL

    def raise_for_status(self) -> JobStatus:
        """Raise `JobFailed` when the job failed; otherwise return self (for chaining)."""
        if self.status == "failed":
            err = self.error or ErrorInfo(message="no reason given")
            raise JobFailed(self.id, err.code, err.message, self)
        return self

    @classmethod
    def from_json(cls, data: Any, kind: JobKind, job_id: str = "") -> JobStatus:
        """Parse a job body; `kind` picks the result type, `job_id` fills a missing id."""
        body = dict(data) if isinstance(data, Mapping) else {}
        result = body.get("result")
        if isinstance(result, Mapping) and kind == "evaluation":
            result = EvaluationResult.from_json(result)
        elif isinstance(result, Mapping):
            parse = CertificateResult if kind == "certification" else PredictionResult
            result = parse.from_json(result)
        else:
            result = None
        return cls(
            id=str(body.get("id") or job_id), status=str(body.get("status") or "unknown"),
            progress=Progress.from_json(body.get("progress")), result=result,
            error=ErrorInfo.from_json(body.get("error")), raw=body,
        )


@dataclass(frozen=True)
class ModelInfo:
    """A registered model bundle (the registry's view of its model.json and digest)."""

    name: str
    kind: str | None = None
    digest: str | None = None
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    labels: tuple[str, ...] | None = None
    sigma: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> ModelInfo:
        if isinstance(data, str):  # a list of bare names
            return cls(name=data)
        body = dict(data) if isinstance(data, Mapping) else {}
        if "name" not in body and isinstance(body.get("model"), Mapping):  # {"model": {...}}
            body = dict(body["model"])
        known, extra = _split(cls, body)
        known["name"] = str(known.get("name", ""))
        for key in ("input_shape", "labels"):
            known[key] = _tuple(known.get(key))
        return cls(**known, extra=extra)


@dataclass(frozen=True)
class ModelMemory:
    """A model's certificate memories as the server reports them: `size` entries in all,
    `namespaces` one per numeric mode, device type and α (dicts), and the rules of a commit
    (`levels`, `min_n`, `quota_per_key`, `your_commits`)."""

    size: int | None = None
    entries: Any = None
    capacity: int | None = None
    levels: tuple[float, ...] | None = None
    min_n: int | None = None
    quota_per_key: int | None = None
    your_commits: int | None = None
    namespaces: tuple[dict[str, Any], ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> ModelMemory:
        known, extra = _split(cls, data if isinstance(data, Mapping) else {})
        for key in ("levels", "namespaces"):
            known[key] = _tuple(known.get(key))
        return cls(**known, extra=extra)
