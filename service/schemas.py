"""Request and response bodies of the HTTP API, in families: `*Request` (what a client
sends), `*Out` (what it gets back), `JobStatus`. Field names are the contract of docs/api.md.

Requests are strict (no "100" for 100, no true for 1, no NaN) and refuse unknown fields, so
a typo is an error instead of a silently ignored option. Checks that need the model or the
settings (σ range, limits, feasibility) are in `service.parameters`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.store import JobKind, JobState
from smoothcert.adaptive import DEFAULT_TOLERANCE, MAX_TOLERANCE
from smoothcert.sequential import MAX_TARGET_RADIUS

ModelName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
Sigma = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=1)]  # the upper limits come from the settings
Alpha = Annotated[float, Field(gt=0, lt=1, description="1 − confidence; strictly in (0, 1)")]
Seed = Annotated[int, Field(ge=0, lt=2**63, description=(
    "memory off only: same seed + same request = same result; the result records seed_source "
    "'caller', and a seed picked after seeing results makes the certificate guarantee nothing"))]
Tolerance = Annotated[float, Field(ge=0, le=MAX_TOLERANCE, allow_inf_nan=False)]
TargetRadius = Annotated[float, Field(ge=0, le=MAX_TARGET_RADIUS, allow_inf_nan=False)]
BatchSize = Annotated[int | None, Field(None, ge=1, description="noisy copies per forward pass; default: "
                                       "measured for the model on the worker's device")]
NumericModeName = Annotated[str | None, Field(None, max_length=64, description=(
    "fp32 (default), bf16, or fp16 (CUDA workers), optionally with +fuse (BatchNorm folded into the "
    "convolutions), +channels_last, +compile or +cuda_graphs; certificates and the memory are per mode"))]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# --- requests ---------------------------------------------------------------------------


class ImageInput(_Strict):
    """Exactly one of: a base64 PNG/JPEG (or .npy), a nested-list tensor in [0, 1], a base64 .npy."""

    image_b64: str | None = None
    tensor: list[Any] | None = Field(None, description="[C][H][W] or [H][W], values in [0, 1]")
    npy_b64: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageInput:
        given = [k for k in ("image_b64", "tensor", "npy_b64") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of image_b64, tensor, npy_b64"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self


class SigmaSearchRequest(_Strict):
    """A per-input σ search; omitted fields take the method's defaults."""

    method: Literal["ddrs", "insta"] = "ddrs"
    steps: Annotated[int, Field(ge=0)] | None = None
    lr: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    samples: Annotated[int, Field(ge=2)] | None = None
    init: Sigma | None = None


class CertificationParams(_Strict):
    """Everything of a certification request but the input (a multipart form's fields)."""

    model: ModelName
    sigma: Sigma | None = Field(None, description="fixed σ (default: the model's); omit with sigma_search")
    sigma_search: SigmaSearchRequest | None = Field(None, description='"ddrs", "insta" or an object')
    bound: Literal["cohen", "two_sided", "drs"] | None = Field(None, description="default: cohen (drs for DRS models)")
    n0: Count = 100
    n: Count = 100_000
    alpha: Alpha = 0.001
    sampling: Literal["fixed", "adaptive", "sequential"] = Field(
        "fixed", description="adaptive: n is the maximum; each input's estimation size is chosen from its "
                             "selection sample (the result's n; n_max the maximum). sequential: n is the "
                             "maximum; votes are drawn in looks and sampling stops as soon as the certified "
                             "radius reaches target_radius or cannot (the result's n and look_alpha: the "
                             "look whose bound is given; samples: every vote drawn)")
    tolerance: Tolerance | None = Field(
        None, description="adaptive sampling: the expected radius loss allowed against n, in units of σ "
                          f"(default {DEFAULT_TOLERANCE})")
    target_radius: TargetRadius | None = Field(
        None, description="sequential sampling: stop as soon as the certified ℓ2 radius reaches it (same "
                          "units as the radius); required with sampling \"sequential\", refused otherwise")
    batch_size: BatchSize = None
    numeric_mode: NumericModeName = None
    memory: bool | None = Field(None, description=(
        "default: true with sigma_search, false with a fixed σ. With the memory on: alpha one of the "
        "service's memory levels, n at least its memory minimum, no seed"))
    seed: Seed | None = None

    @field_validator("sigma_search", mode="before")
    @classmethod
    def _method_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"method": value}
        if value is not None and not isinstance(value, dict):
            raise ValueError("must be a method name ('ddrs' or 'insta') or an object with "
                             "method and optional steps, lr, samples, init")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CertificationParams:
        if self.sigma is not None and self.sigma_search is not None:
            raise ValueError("give either sigma or sigma_search, not both")
        if self.n0 > self.n:
            raise ValueError(f"n0 ({self.n0}) must not exceed n ({self.n})")
        return self


class CertificationRequest(CertificationParams):
    input: ImageInput


class EvaluationParams(CertificationParams):
    """A certification of every `every`-th example of an uploaded dataset, in order."""

    every: Count = Field(1, description="certify every k-th example")
    limit: Count | None = Field(None, description="at most this many examples")


class EvaluationRequest(EvaluationParams):
    dataset_b64: str = Field(description="an .npz (x, y) or a zip of class folders, base64")


class PredictOptions(_Strict):
    """PREDICT's parameters: a prediction's fields and the OIP infer `parameters`."""

    sigma: Sigma | None = Field(None, description="default: the model's σ")
    n: Count = 10_000
    alpha: Alpha = 0.001
    batch_size: BatchSize = None
    numeric_mode: NumericModeName = None
    seed: Seed | None = None


class PredictionParams(PredictOptions):
    model: ModelName


class PredictionRequest(PredictionParams):
    input: ImageInput


class InferTensor(_Strict):
    """One input tensor of the Open Inference Protocol (v2), data flat in row-major order."""

    name: str
    shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=2, max_length=4)]
    datatype: Literal["FP32", "UINT8"]
    data: list[float]
    parameters: dict[str, Any] | None = None


class InferParameters(PredictOptions):
    pass


class InferRequest(_Strict):
    id: str | None = None
    inputs: Annotated[list[InferTensor], Field(min_length=1, max_length=1)]
    parameters: InferParameters = InferParameters()
    outputs: list[dict[str, Any]] | None = None  # accepted and ignored: there is one output


# --- responses --------------------------------------------------------------------------


class ErrorOut(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorOut


class JobOut(BaseModel):
    id: str
    status: str


class CertificationOut(JobOut):
    pass


class EvaluationOut(JobOut):
    pass


class PredictionOut(JobOut):
    pass


class ProgressOut(BaseModel):
    stage: str
    samples_done: int
    samples_total: int


class ModelRef(BaseModel):
    name: str
    digest: str


class JobStatus(BaseModel):
    id: str
    kind: JobKind
    status: JobState
    progress: ProgressOut | None
    result: dict[str, Any] | None
    error: ErrorOut | None
    model: ModelRef
    request: dict[str, Any] = Field(description=(
        "the validated parameters, seed and seed_source included; a seed the service drew for the shared "
        "memory is null until the job has succeeded"))
    created: float
    started: float | None
    finished: float | None


class SigmaRangeOut(BaseModel):
    default: float
    min: float
    max: float


class ModelOut(BaseModel):
    """A registered model: what it takes and answers, and the digest certificates name."""

    name: str
    digest: str
    kind: str
    input_shape: list[int]
    num_classes: int
    labels: list[str]
    sigma: SigmaRangeOut
    size: int = Field(description="bundle bytes")
    created: float
    spec: dict[str, Any] = Field(description="the bundle's model.json")


class ModelsOut(BaseModel):
    models: list[ModelOut]


class MemoryNamespaceOut(BaseModel):
    """One memory of a model: one numeric mode on one device type at one level α."""

    namespace: str = Field(description="digest/numeric mode/device type/alpha")
    numeric_mode: str
    device: str
    alpha: float
    entries: int = Field(description="committed entries (what `capacity` bounds)")
    bytes: int = Field(description="bytes the memory log takes in Redis")


class MemoryOut(BaseModel):
    """A model's certificate memories: one per numeric mode, device type and α, shared by
    every API key (docs/guarantees.md §3), with the rules every commit follows."""

    model: str
    digest: str
    size: int = Field(description="committed entries over all the model's memories")
    entries: int = Field(description="the same as `size`")
    bytes: int = Field(description="bytes the memory logs take in Redis")
    capacity: int = Field(description="the most entries one memory holds; a full memory refuses commits")
    levels: list[float] = Field(description="the α a certification with the memory on may use")
    min_n: int = Field(description="the fewest estimation samples of a committed certificate")
    quota_per_key: int = Field(description="the most entries one API key may commit to this model's memories "
                                           "(0: no quota)")
    your_commits: int = Field(description="the entries the calling key has committed to them")
    namespaces: list[MemoryNamespaceOut]


class HealthOut(BaseModel):
    status: str
    redis: bool | None = None
    workers: int | None = None


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[int]


class InferOut(BaseModel):
    model_name: str
    model_version: str
    id: str
    outputs: list[InferOutput]
    parameters: dict[str, Any]
