"""Request and response bodies of the HTTP API, in families: `*Request` (what a client
sends), `*Out` (what it gets back), `JobStatus`. Field names are the contract of docs/api.md.

Requests are strict (no "100" for 100, no true for 1, no NaN) and refuse unknown fields, so
a typo is an error instead of a silently ignored option. Checks that need the model or the
settings (σ range, limits, feasibility) are in `service.parameters`.
"""

from __future__ import annotations

import base64
import io
import math
import zipfile
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

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


# The Open Inference Protocol (v2) request, as its JSON header: what `service.oip` checks
# against the model and turns into jobs. Its `parameters` are the protocol's: scalars only.
def _scalars(parameters: dict[str, Any]) -> dict[str, Any]:
    for key, value in parameters.items():
        if not (isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value))):
            raise ValueError(f"{key!r} is {type(value).__name__ if value is not None else 'null'}: parameters "
                             "are scalars (a boolean, an integer, a finite number or a string), never null")
    return parameters


OIPParameters = Annotated[dict[Annotated[str, Field(max_length=256)], Any], AfterValidator(_scalars),
                          Field(max_length=64, description="scalars only: boolean, integer, number or string")]


def _one_input(inputs: list[Any]) -> list[Any]:
    if len(inputs) != 1:
        raise ValueError(f"the model takes exactly one input tensor, got {len(inputs)}: send several images "
                         "as one batch tensor of shape [B, C, H, W]")
    return inputs


class InferInputTensor(_Strict):
    """One input tensor: `data` in row-major order, flat or nested to the shape, or (binary
    tensor extension) `parameters.binary_data_size` bytes after the JSON header."""

    name: Annotated[str, Field(max_length=256)]
    shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=2, max_length=4, description=(
        "[B, C, H, W] or [B, H, W] (one channel) for a batch; [C, H, W] or [H, W] for one image"))]
    datatype: Annotated[str, Field(max_length=16, description="FP32, FP64, FP16 or UINT8 (0-255, divided by 255)")]
    parameters: OIPParameters | None = None
    data: Any = None


class InferRequestedOutput(_Strict):
    """An output asked for by name; `parameters.binary_data` (bool) and `parameters.datatype`
    ("FP32" for a float output, rounded in its safe direction) say how it is sent."""

    name: Annotated[str, Field(max_length=256)]
    parameters: OIPParameters | None = None


class InferRequest(_Strict):
    """An inference request of the Open Inference Protocol (v2)."""

    id: Annotated[str, Field(max_length=256)] | None = None
    model_name: Annotated[str, Field(max_length=128)] | None = Field(
        None, description="optional (KServe's client sends it): must be the model of the URL")
    inputs: Annotated[list[InferInputTensor], AfterValidator(_one_input), Field(min_length=1, description=(
        "exactly one tensor: the images, a batch or one"))]
    outputs: Annotated[list[InferRequestedOutput], Field(max_length=64)] | None = None
    parameters: OIPParameters | None = None


# --- request examples (OpenAPI) --------------------------------------------------------
# Each is a request the API accepts for the demo model "digits" ([1, 8, 8]), as it is
# registered by `smoothcert up` (tests/service/test_openapi.py submits every one of them).

# examples/digit-7.png: the demo model's example input, an 8×8 greyscale PNG.
DIGIT_7_PNG_B64 = ("iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAAAAADhZOFXAAAAQklEQVR4nC3KQRGAIBAAwB0SXARsQAQi2MAKNjGCUbAB"
                   "EaxAg/Pjvhd15gXGOLMh3ia7Ym1xq2Dmn/YZFBzPApEdH8G3EcaBn2t6AAAAAElFTkSuQmCC")
DIGIT_7_PIXELS = [  # its pixels, 0-255
    [0, 0, 32, 207, 255, 143, 0, 0], [0, 0, 191, 191, 112, 255, 48, 0], [0, 16, 223, 48, 0, 255, 64, 0],
    [0, 0, 0, 64, 159, 255, 96, 0], [0, 0, 0, 207, 255, 255, 143, 0], [0, 0, 0, 80, 207, 16, 0, 0],
    [0, 0, 0, 175, 143, 0, 0, 0], [0, 0, 16, 255, 64, 0, 0, 0]]


def _npz_b64(**arrays: np.ndarray) -> str:
    """An .npz as base64, byte for byte the same every time (np.savez stamps the current time,
    and the schema must not change between API processes)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, array, allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return base64.b64encode(out.getvalue()).decode()


def _example(summary: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"summary": summary, "value": value}


_DIGIT = {"image_b64": DIGIT_7_PNG_B64}
CERTIFICATION_EXAMPLES = {
    "fixed_sigma": _example("A PNG at a fixed σ (the model's default when omitted)",
                            {"model": "digits", "input": _DIGIT, "sigma": 0.25, "n": 100_000, "alpha": 0.001}),
    "sigma_search": _example(
        "A σ searched for this input (DDRS), answered through the shared memory",
        {"model": "digits", "input": _DIGIT, "sigma_search": "ddrs", "n": 100_000, "alpha": 0.001}),
    "sequential": _example(
        "Sequential sampling: stop as soon as radius 0.25 is certified",
        {"model": "digits", "input": _DIGIT, "sampling": "sequential", "target_radius": 0.25, "n": 100_000}),
    "tensor_seed": _example(
        "A nested-list tensor in [0, 1], with a caller's seed to reproduce a run (memory off)",
        {"model": "digits", "input": {"tensor": [[[round(p / 255, 4) for p in row] for row in DIGIT_7_PIXELS]]},
         "sigma": 0.25, "n": 10_000, "seed": 7}),
}
PREDICTION_EXAMPLES = {
    "png": _example("The smoothed class of a PNG (PREDICT)",
                    {"model": "digits", "input": _DIGIT, "sigma": 0.25, "n": 10_000, "alpha": 0.001}),
}
EVALUATION_EXAMPLES = {
    "npz": _example(
        "A one-example .npz (x uint8 [1, 8, 8], y [7]) at a fixed σ",
        {"model": "digits", "dataset_b64": _npz_b64(x=np.array([DIGIT_7_PIXELS], dtype=np.uint8),
                                                    y=np.array([7], dtype=np.int64)),
         "sigma": 0.25, "n": 1000, "alpha": 0.001}),
}
# A multipart form: every field but the file as a form field (the file part is `image`,
# `dataset` or `bundle`, chosen in the form).
CERTIFICATION_FORM_EXAMPLE = {"model": "digits", "sigma": 0.25, "n": 100_000, "alpha": 0.001}
PREDICTION_FORM_EXAMPLE = {"model": "digits", "sigma": 0.25, "n": 10_000}
EVALUATION_FORM_EXAMPLE = {"model": "digits", "sigma": 0.25, "n": 1000, "every": 1, "limit": 100}
# PREDICT only: with `parameters.smoothcert_task = "certify"` the same body asks for certificates
# (docs/api.md); tests/service/test_fuzz.py replays examples against a stand-in worker that
# answers predictions alone.
INFER_EXAMPLES = {
    "predict": _example(
        "Two images as one UINT8 batch [2, 1, 8, 8]: the smoothed class of each",
        {"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "UINT8",
                     "data": [p for _ in range(2) for row in DIGIT_7_PIXELS for p in row]}],
         "parameters": {"n": 1000, "seed": 7}}),
}


# --- responses --------------------------------------------------------------------------


class ErrorOut(BaseModel):
    code: str = Field(description="stable, for programs (docs/api.md lists them)")
    message: str = Field(description="for people: what to change")


class ErrorBody(BaseModel):
    """Every error of the API but the /v2 routes' (docs/api.md, Errors)."""

    error: ErrorOut


class JobOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"id": "3f0c5a2e9b8d4c1f8e7a6b5c4d3e2f10",
                                                               "status": "queued"}]})

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
    """A health probe's answer: `live` and `ready` as the Open Inference Protocol names them
    (KServe's and Triton's clients read those), `status` as people read it."""

    status: str
    live: bool | None = None
    ready: bool | None = None
    redis: bool | None = None
    workers: int | None = None


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, bool | int | float | str] | None = None
    data: list[Any] | None = Field(None, description="absent when sent as binary (parameters.binary_data_size)")


class InferOut(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(None, description="the request's id, when it had one")
    parameters: dict[str, bool | int | float | str]
    outputs: list[InferOutput]


class MemoryRulesOut(BaseModel):
    levels: list[float] = Field(description="the α a certification with the memory on may use "
                                            "(SMOOTHCERT_MEMORY_ALPHAS)")
    min_n: int = Field(description="the fewest estimation samples with the memory on (SMOOTHCERT_MEMORY_MIN_N)")
    quota_per_key: int = Field(description="entries one key may commit to one model's memories (0: no quota)")
    capacity: int = Field(description="the most entries one memory holds")


class LimitsOut(BaseModel):
    """The request limits of this deployment (settings `SMOOTHCERT_<NAME>`): a request past
    one is refused with a 4xx naming it. What fits the model (σ range, input shape) is
    `GET /v1/models/{name}`'s."""

    max_n: int
    max_n0: int
    max_alpha: float = Field(description="the laxest α any certificate may have")
    max_batch_size: int
    max_pixels: int = Field(description="H·W of an input image")
    max_body_bytes: int
    max_bundle_bytes: int
    max_dataset_bytes: int
    max_evaluation_examples: int
    max_wait_seconds: float = Field(description="the longest long-poll (`?wait=`)")
    job_ttl_seconds: int = Field(description="jobs and their inputs expire this long after creation")
    job_time_limit_seconds: int
    rate_limit_per_second: float = Field(description="per key, job submissions (0: off)")
    rate_limit_burst: int = Field(description="per key, submissions at once")
    max_open_jobs_per_key: int = Field(description="per key, queued and running jobs (0: off)")
    memory: MemoryRulesOut
