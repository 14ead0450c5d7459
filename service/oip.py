"""The Open Inference Protocol (v2, "KServe protocol") as smoothcert speaks it: reading an
inference request (JSON tensors, or the binary tensor extension), the task and parameters it
asks for, the outputs it wants and how, and writing the response and the metadata.

Pure functions of bytes, the model's spec and the settings: no store, no FastAPI routing
(`service.routes.infer` is the HTTP half). Every refusal is an `APIError` (400 for a
malformed request, 413 for a batch too large, 415 for an unknown body encoding), raised
before anything is stored. What a request can ask for is in docs/api.md, "Open Inference
Protocol v2".
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from service.errors import APIError, describe_validation
from service.schemas import CertificationParams, InferRequest, InferRequestedOutput, PredictOptions
from smoothcert.imageio import ImageError, to_unit_float
from smoothcert.manifest import ModelSpec
from smoothcert.seeds import derive_seed

M = TypeVar("M", bound=BaseModel)
HEADER_LENGTH = "Inference-Header-Content-Length"
PLATFORM = "smoothcert"
EXTENSIONS = ("binary_tensor_data",)
INPUT_NAME = "input"
TASK = "smoothcert_task"
TASKS = ("predict", "certify")
# Elements of one request, each its own job: a request is answered whole or not at all, so
# this bounds what one call holds open (the per-key and queue limits still apply per job).
MAX_BATCH = 256
# The datatypes an input may have, as little-endian numpy dtypes (the binary extension's layout).
INPUT_DTYPES = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "UINT8": "u1"}
_BINARY_OUT = {"INT64": "<i8", "FP64": "<f8", "FP32": "<f4", "BOOL": "u1"}
# Request parameters of the protocol itself (the rest are the task's own).
_CONTROL = ("smoothcert_task", "binary_data_output", "timeout")
_UNSUPPORTED = {"sequence_id": "sequences", "sequence_start": "sequences", "sequence_end": "sequences",
                "priority": "priorities", "headers": "forwarded headers"}
# The certify task runs at a fixed σ with the memory off: what the memory classifier and a
# searched σ certify is another function, which a synchronous call cannot describe per element.
_CERTIFY_EXCLUDED = ("model", "memory", "sigma_search")


def bad(message: str) -> APIError:
    """A malformed or impossible request: 400 on the OIP routes."""
    return APIError(400, "invalid_request", message)


# --- the body ------------------------------------------------------------------------------


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """The body under its Content-Encoding (identity, gzip or deflate), at most `limit`
    bytes once inflated (413 past it, so a small bomb is refused as a large body is)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise APIError(415, "unsupported_media_type",
                       f"Content-Encoding {encoding!r} is not supported: send identity, gzip or deflate")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise bad(f"the body is not valid {encoding} data: {exc}") from None
    if len(out) > limit:
        raise APIError(413, "too_large", f"the request body inflates to more than the {limit} bytes accepted")
    if not inflater.eof or inflater.unused_data:
        raise bad(f"the {encoding} body is truncated or has bytes after its end")
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_request(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes | None]:
    """(the JSON inference request, the binary tensor bytes after it). Without the
    `Inference-Header-Content-Length` header the whole body is JSON, whatever its
    Content-Type (and the bytes are None); with it, the header's first bytes are the JSON
    and the rest binary tensors."""
    binary = None
    if header_length is not None:
        text = header_length.strip()
        if not text.isdigit() or int(text) > len(body):
            raise bad(f"{HEADER_LENGTH}: {header_length!r} is not a byte count within the {len(body)}-byte body")
        body, binary = body[:int(text)], body[int(text):]
    try:
        document = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise bad("the inference request is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN and Infinity
        raise bad(f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise bad(f"the inference request must be a JSON object, got {type(document).__name__}")
    return validate(InferRequest, document), binary


def validate(model: type[M], data: Any, where: str = "") -> M:
    """`model` of `data`, or a 400 naming each field (`where` prefixed) and what is wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [{**e, "loc": (where, *e["loc"]) if where else e["loc"]}
                  for e in exc.errors(include_url=False, include_input=False)]
        raise bad(describe_validation(errors)) from None


# --- the input tensor ----------------------------------------------------------------------


def batch_of(shape: Sequence[int], input_shape: Sequence[int]) -> tuple[int, bool]:
    """(elements, batched) of an input of `shape` for a model taking `input_shape` [C, H, W]:
    `[B, C, H, W]`, or `[B, H, W]` when C is 1, is a batch; `[C, H, W]` (or `[H, W]` when C
    is 1) is one image. `[1, H, W]` for a one-channel model is one image either way. A batch
    of more than MAX_BATCH is 413, known from the shape alone (before any token is taken)."""
    c, h, w = (int(s) for s in input_shape)
    s = tuple(shape)
    if s == (c, h, w) or (c == 1 and s == (h, w)):
        return 1, False
    if (len(s) == 4 and s[1:] == (c, h, w)) or (c == 1 and len(s) == 3 and s[1:] == (h, w)):
        if s[0] > MAX_BATCH:
            raise APIError(413, "too_large", f"inputs[0]: a batch of {s[0]} images is more than the {MAX_BATCH} "
                           "one request may hold (each is a job): split it")
        return s[0], True
    one = f"[B, {h}, {w}], " if c == 1 else ""
    raise bad(f"inputs[0].shape {list(s)} does not fit the model's input [{c}, {h}, {w}]: send a batch "
              f"[B, {c}, {h}, {w}] ({one}B ≥ 1), or one image [{c}, {h}, {w}]; inputs are never resized")


def input_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of an input datatype; 400 for one smoothcert does not take."""
    if datatype in INPUT_DTYPES:
        return np.dtype(INPUT_DTYPES[datatype])
    if datatype == "BYTES":
        raise bad("inputs[0].datatype BYTES is not supported: decode the image and send its pixels as FP32 "
                  "in [0, 1] or UINT8 in 0-255 (or POST the PNG/JPEG to /v1/predictions)")
    raise bad(f"inputs[0].datatype {datatype!r} is not supported: send {', '.join(INPUT_DTYPES)}")


def _nested(node: Any, shape: Sequence[int], index: tuple[int, ...], out: list[Any]) -> None:
    depth = len(index)
    if not isinstance(node, list) or len(node) != shape[depth]:
        found = f"a list of {len(node)}" if isinstance(node, list) else type(node).__name__
        raise bad(f"inputs[0].data{list(index)} is {found} where the shape {list(shape)} needs a list of "
                  f"{shape[depth]}: send data flat in row-major order, or nested exactly as the shape")
    if depth + 1 == len(shape):
        out.extend(node)
        return
    for i, child in enumerate(node):
        _nested(child, shape, (*index, i), out)


def _json_values(data: Any, shape: Sequence[int], datatype: str) -> np.ndarray:
    """The numbers of a JSON `data` (flat, or nested as the shape): float64, or uint8 for UINT8."""
    if not isinstance(data, list):
        raise bad(f"inputs[0].data must be an array of numbers, got {type(data).__name__}")
    leaves = data if not any(isinstance(v, list) for v in data) else []
    if leaves is not data:
        _nested(data, shape, (), leaves)
    if len(leaves) != math.prod(shape):
        raise bad(f"inputs[0]: shape {list(shape)} holds {math.prod(shape)} values, data has {len(leaves)}")
    integer = datatype == "UINT8"
    for i, v in enumerate(leaves):  # bool is an int subclass: refused by the exact type test
        kind = type(v)
        if (kind is float and not integer) or (kind is int and (not integer or 0 <= v <= 255)):
            continue
        want = "an integer in 0-255" if integer else "a number"
        raise bad(f"inputs[0].data[{i}] is {v!r} ({kind.__name__}): {datatype} data must be {want}")
    try:
        return np.array(leaves, dtype=np.uint8 if integer else np.float64)
    except (OverflowError, ValueError) as exc:
        raise bad(f"inputs[0].data holds a value that is not a usable number: {exc}") from None


def read_images(request: InferRequest, binary: bytes | None, spec: ModelSpec) -> tuple[np.ndarray, bool]:
    """(float32 [B, C, H, W] in [0, 1], batched) of the request's one input tensor: JSON
    `data`, or `parameters.binary_data_size` raw little-endian bytes after the JSON. The
    checks of a /v1 input (finite, in [0, 1], uint8 scaled by 1/255), the shape exactly the
    model's (never resized), at most MAX_BATCH elements (413: `batch_of`)."""
    tensor = request.inputs[0]
    dtype = input_dtype(tensor.datatype)
    size, batched = batch_of(tensor.shape, spec.input_shape)
    params = dict(tensor.parameters or {})
    content_type = params.pop("content_type", "np")  # Seldon MLServer's codec name: only a tensor here
    binary_size = params.pop("binary_data_size", None)
    for key in params:
        what = "shared memory is" if key.startswith("shared_memory") else f"the parameter {key!r} is"
        raise bad(f"inputs[0].parameters: {what} not supported (binary_data_size is)")
    if content_type != "np":
        raise bad(f"inputs[0].parameters.content_type {content_type!r} is not supported: the input is a tensor")
    if binary_size is not None:
        expected = math.prod(tensor.shape) * dtype.itemsize
        if type(binary_size) is not int or binary_size != expected:
            raise bad(f"inputs[0].parameters.binary_data_size is {binary_size!r}: shape {tensor.shape} of "
                      f"{tensor.datatype} takes {expected} bytes")
        if tensor.data is not None:
            raise bad("inputs[0] has both data and parameters.binary_data_size: send one")
        if binary is None:
            raise bad(f"inputs[0] has parameters.binary_data_size but the request has no {HEADER_LENGTH} header "
                      "saying where the JSON ends and the tensor bytes begin")
        if len(binary) != binary_size:
            raise bad(f"the body holds {len(binary)} bytes after the JSON header ({HEADER_LENGTH}); "
                      f"inputs[0].parameters.binary_data_size says {binary_size}")
        values = np.frombuffer(binary, dtype=dtype)
    else:
        if binary:
            raise bad(f"the body holds {len(binary)} bytes after the JSON header ({HEADER_LENGTH}) but no "
                      "input has parameters.binary_data_size")
        if tensor.data is None:
            raise bad("inputs[0] has no data: give data, or parameters.binary_data_size and the bytes after "
                      f"the JSON header ({HEADER_LENGTH})")
        values = _json_values(tensor.data, tensor.shape, tensor.datatype)
    try:
        images = to_unit_float(values, "inputs[0]")
    except ImageError as exc:
        raise bad(str(exc)) from None
    if values.dtype == np.float64 and tensor.datatype != "FP64":  # JSON numbers: the declared precision
        images = values.astype(dtype).astype(np.float32)
    return images.reshape((size, *spec.input_shape)), batched


# --- parameters and task ---------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """What the request asks: `task` ("predict" or "certify"), its engine parameters as
    validated (`PredictOptions` or `CertificationParams`), whether outputs default to
    binary, and the wait its `timeout` asks (seconds; None: the server's)."""

    task: str
    options: PredictOptions | CertificationParams
    binary_output: bool
    timeout: float | None


def task_parameters(task: str) -> tuple[str, ...]:
    """The engine parameters a task takes in `parameters`."""
    if task == "predict":
        return tuple(PredictOptions.model_fields)
    return tuple(k for k in CertificationParams.model_fields if k not in _CERTIFY_EXCLUDED)


def read_task(parameters: Mapping[str, Any] | None, model_name: str) -> Task:
    """The request-wide `parameters`: `smoothcert_task` ("predict", the default, or
    "certify"), `binary_data_output` (bool), `timeout` (microseconds, Triton's), and the
    task's own (a prediction's or a fixed-σ certification's fields); anything else is 400."""
    params = dict(parameters or {})
    task = params.pop(TASK, "predict")
    if task not in TASKS:
        raise bad(f"parameters.{TASK}: {task!r} is not a task: use 'predict' (the default) or 'certify'")
    binary_output = params.pop("binary_data_output", False)
    if type(binary_output) is not bool:
        raise bad(f"parameters.binary_data_output must be a boolean, got {binary_output!r}")
    timeout = params.pop("timeout", None)
    if timeout is not None and (type(timeout) is not int or timeout <= 0):
        raise bad(f"parameters.timeout must be a positive integer of microseconds, got {timeout!r}")
    allowed = task_parameters(task)
    for key in params:
        if key in _UNSUPPORTED:
            raise bad(f"parameters.{key}: {_UNSUPPORTED[key]} are not supported")
        if key not in allowed:
            extra = (" (the certify task runs at a fixed sigma with the memory off; POST /v1/certifications "
                     "for the memory or a sigma search)") if task == "certify" and key in _CERTIFY_EXCLUDED else ""
            raise bad(f"parameters.{key}: not a parameter of the {task} task{extra}; it takes "
                      f"{', '.join(allowed)}, and {', '.join(_CONTROL)}")
    if task == "predict":
        options: PredictOptions | CertificationParams = validate(PredictOptions, params, "parameters")
    else:
        options = validate(CertificationParams, {**params, "model": model_name, "memory": False}, "parameters")
    return Task(task, options, binary_output, None if timeout is None else timeout / 1e6)


def element_seed(seed: int, index: int) -> int:
    """The seed of element `index` of a request seeded with `seed` (smoothcert.seeds, the
    engine's own derivation: independent streams, 63 bits)."""
    return derive_seed(seed, index)


# --- outputs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputSpec:
    """An output tensor of shape [B] (or [B, 2] with `width` 2) from each element's job result
    `field`. `safe` is the direction a float is rounded when sent as FP32 ("down" for a radius
    or a lower bound, "up" for an upper bound, a p-value or a level), and `missing` the value
    sent where a job reported none: itself on the safe side (no class, radius 0, bounds 0 and 1)."""

    name: str
    datatype: str
    missing: Any
    safe: str | None = None
    width: int = 1
    field: str | None = None

    @property
    def key(self) -> str:
        return self.field or self.name


_PREDICTION = OutputSpec("prediction", "INT64", -1)
_ABSTAINED = OutputSpec("abstained", "BOOL", True)
_COMMON = (OutputSpec("seed", "INT64", -1), OutputSpec("batch_size", "INT64", -1), OutputSpec("samples", "INT64", -1))
PREDICT_OUTPUTS = (_PREDICTION, _ABSTAINED, OutputSpec("p_value", "FP64", 1.0, "up"), *_COMMON)
_RADIUS = (OutputSpec("radius", "FP64", 0.0, "down"),)
_BOUND_OUTPUTS = {
    "cohen": (OutputSpec("p_a_lower", "FP64", 0.0, "down"), OutputSpec("n_a", "INT64", -1)),
    "two_sided": (OutputSpec("p_a_lower", "FP64", 0.0, "down"), OutputSpec("p_b_upper", "FP64", 1.0, "up"),
                  OutputSpec("n_a", "INT64", -1)),
    "drs": (OutputSpec("p_a_lower_halves", "FP64", 0.0, "down", 2), OutputSpec("n_a_halves", "INT64", -1, None, 2)),
}
_CERTIFY_TAIL = (OutputSpec("n", "INT64", -1), OutputSpec("noise_sigma", "FP64", 0.0, "down"),
                 OutputSpec("noise_tail", "FP64", 1.0, "up"))
_LOOK_ALPHA = OutputSpec("look_alpha", "FP64", 1.0, "up")


def outputs_of(task: str, bound: str | None = None, sampling: str | None = None) -> tuple[OutputSpec, ...]:
    """Every output a request of this task (and, certifying, bound and sampling) produces, in order."""
    if task == "predict":
        return PREDICT_OUTPUTS
    look = (_LOOK_ALPHA,) if sampling == "sequential" else ()
    return (_PREDICTION, _ABSTAINED, *_RADIUS, *_BOUND_OUTPUTS[bound or "cohen"], *_CERTIFY_TAIL, *look, *_COMMON)


def model_outputs(spec: ModelSpec) -> list[OutputSpec]:
    """Every output the model can produce, over the tasks, bounds and samplings it takes."""
    combos = ([("certify", "drs", "sequential")] if spec.kind == "drs" else
              [("predict", None, None), ("certify", "two_sided", "sequential")])
    seen: dict[str, OutputSpec] = {}
    for task, bound, sampling in combos:
        for out in outputs_of(task, bound, sampling):
            seen.setdefault(out.name, out)
    return list(seen.values())


@dataclass(frozen=True)
class Selected:
    """An output to send: its spec, its datatype as sent (FP32 for a float asked so), binary or JSON."""

    spec: OutputSpec
    datatype: str
    binary: bool


def select_outputs(requested: Sequence[InferRequestedOutput] | None, available: Sequence[OutputSpec],
                   binary_default: bool, task: str) -> list[Selected]:
    """The outputs to send: every available one when none is asked for (the protocol's
    rule), else exactly those asked, in the order asked. `binary_data` (per output) overrides
    `binary_output` (the request's `binary_data_output`); `datatype` "FP32" sends a float
    output rounded in its safe direction."""
    if not requested:
        return [Selected(o, o.datatype, binary_default) for o in available]
    by_name = {o.name: o for o in available}
    chosen: list[Selected] = []
    for i, out in enumerate(requested):
        where = f"outputs[{i}]"
        if out.name not in by_name:
            raise bad(f"{where}: {out.name!r} is not an output of this request ({task} task): it produces "
                      f"{', '.join(by_name)}")
        if any(s.spec.name == out.name for s in chosen):
            raise bad(f"{where}: {out.name!r} is asked for twice")
        spec, params = by_name[out.name], dict(out.parameters or {})
        binary = params.pop("binary_data", binary_default)
        datatype = params.pop("datatype", spec.datatype)
        for key in params:
            what = {"classification": "the classification extension is"}.get(
                key, "shared memory is" if key.startswith("shared_memory") else f"the parameter {key!r} is")
            raise bad(f"{where}.parameters: {what} not supported (binary_data and datatype are)")
        if type(binary) is not bool:
            raise bad(f"{where}.parameters.binary_data must be a boolean, got {binary!r}")
        if datatype != spec.datatype and not (spec.datatype == "FP64" and datatype == "FP32"):
            choices = "FP64 or FP32" if spec.datatype == "FP64" else spec.datatype
            raise bad(f"{where}.parameters.datatype: {out.name} is sent as {choices}, not {datatype!r}")
        chosen.append(Selected(spec, datatype, binary))
    return chosen


def to_float32(values: np.ndarray, safe: str | None) -> np.ndarray:
    """float64 values as float32, rounded toward `safe` ("down": never above the value, "up":
    never below it): a radius sent in FP32 is never larger than the radius certified."""
    out = values.astype(np.float32)
    wide = out.astype(np.float64)
    if safe == "down":
        out = np.where(wide > values, np.nextafter(out, np.float32(-np.inf)), out)
    elif safe == "up":
        out = np.where(wide < values, np.nextafter(out, np.float32(np.inf)), out)
    return out.astype(np.float32)


def _value(result: Mapping[str, Any], spec: OutputSpec) -> Any:
    if spec.name == "abstained":  # by construction the same answer as `prediction`
        return result.get("prediction") is None
    value = result.get(spec.key)
    if spec.width == 2:
        return list(value) if isinstance(value, (list, tuple)) and len(value) == 2 else [spec.missing] * 2
    return spec.missing if value is None else value


def column(results: Sequence[Mapping[str, Any]], selected: Selected) -> np.ndarray:
    """One output over the batch, as the numpy array it is sent as."""
    spec = selected.spec
    values = [_value(r, spec) for r in results]
    if spec.datatype == "BOOL":
        return np.array(values, dtype=bool)
    if spec.datatype == "INT64":
        return np.array(values, dtype=np.int64)
    floats = np.array(values, dtype=np.float64)
    return to_float32(floats, spec.safe) if selected.datatype == "FP32" else floats


def encode_response(head: dict[str, Any], selected: Sequence[Selected],
                    results: Sequence[Mapping[str, Any]]) -> tuple[bytes, dict[str, str], str]:
    """(body, headers, media type) of an inference response: JSON, or (when an output is
    binary) the JSON header then each binary output's little-endian bytes, in output order,
    with `Inference-Header-Content-Length`. Strict JSON: a NaN would be a bug, and raises."""
    outputs, blobs = [], []
    for sel in selected:
        array = column(results, sel)
        out: dict[str, Any] = {"name": sel.spec.name, "datatype": sel.datatype, "shape": list(array.shape)}
        if sel.binary:
            blob = array.astype(_BINARY_OUT[sel.datatype]).tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = array.ravel().tolist()
        outputs.append(out)
    header = json.dumps({**head, "outputs": outputs}, allow_nan=False, separators=(",", ":")).encode()
    if not blobs:
        return header, {}, "application/json"
    return header + b"".join(blobs), {HEADER_LENGTH: str(len(header))}, "application/octet-stream"


def scalars(values: Mapping[str, Any]) -> dict[str, Any]:
    """Response parameters: the protocol's scalars only, a null left out."""
    return {k: v for k, v in values.items() if isinstance(v, (bool, int, float, str))}


# --- metadata --------------------------------------------------------------------------------


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: the batch dimension")


class ServerMetadataOut(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadataOut(BaseModel):
    name: str
    versions: list[str] = Field(description="the one version: the bundle's digest")
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: dict[str, bool | int | float | str]


class ModelReadyOut(BaseModel):
    name: str
    ready: bool


class OIPErrorBody(BaseModel):
    """The protocol's error body: a string."""

    error: str


def model_metadata(name: str, digest: str, spec: ModelSpec) -> ModelMetadataOut:
    """The protocol's model metadata; `parameters` adds what a caller needs to pick σ and a task."""
    c, h, w = spec.input_shape
    tasks = "certify" if spec.kind == "drs" else "predict,certify"
    return ModelMetadataOut(
        name=name, versions=[digest], platform=PLATFORM,
        inputs=[MetadataTensor(name=INPUT_NAME, datatype="FP32", shape=[-1, c, h, w])],
        outputs=[MetadataTensor(name=o.name, datatype=o.datatype, shape=[-1] if o.width == 1 else [-1, o.width])
                 for o in model_outputs(spec)],
        parameters={"kind": spec.kind, "num_classes": spec.num_classes, "sigma_default": spec.sigma.default,
                    "sigma_min": spec.sigma.min, "sigma_max": spec.sigma.max, "tasks": tasks,
                    # a σ selector chooses among these itself: no sigma parameter (docs/api.md)
                    **({"sigma_levels": ",".join(map(repr, spec.selector.sigmas)), "sigma_e": spec.selector.sigma_e}
                       if spec.selector is not None else {})},
    )


def oip_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses of an OIP route: the protocol's string body."""
    from http import HTTPStatus

    return {s: {"model": OIPErrorBody, "description": HTTPStatus(s).phrase} for s in statuses}
