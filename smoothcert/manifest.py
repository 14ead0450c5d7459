"""`model.json`: the validated description of a model bundle (docs/bundles.md).

Torch-free (standard library only), so the API can check an uploaded bundle's manifest
without loading torch. Every refusal is a BundleError whose message names the field.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

MAX_INPUT_ELEMENTS = 2**24  # C·H·W; bounds the probe batches a model.json can make us allocate
MAX_CLASSES = 100_000  # bounds the default label list a model.json can make us build
# remote: a base classifier served over the Open Inference Protocol v2; selector: a σ
# estimator choosing among noise levels, and the classifier(s) at those levels
KINDS = ("standard", "drs", "remote", "selector")
MAX_LEVELS = 16  # noise levels a σ selector chooses among


class BundleError(ValueError):
    """A bundle was refused; the message says what to change."""


def _bad(field_name: str, problem: str) -> BundleError:
    return BundleError(f"model.json: {field_name!r} {problem}")


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"must be a finite number, got {value!r}")
    return float(value)


def _integer(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(name, f"must be an integer in [{low}, {high}], got {value!r}")
    return value


def _keys(obj: Any, name: str, allowed: set[str], required: set[str]) -> dict:
    if not isinstance(obj, dict):
        raise _bad(name, f"must be a JSON object, got {type(obj).__name__}")
    if unknown := sorted(set(obj) - allowed):
        raise _bad(name, f"has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    if missing := sorted(required - set(obj)):
        raise _bad(name, f"lacks required key(s) {missing}")
    return obj


@dataclass(frozen=True)
class SigmaRange:
    """Noise levels a model accepts: finite, 0 < min ≤ default ≤ max."""

    default: float
    min: float
    max: float

    def __post_init__(self) -> None:
        for key in ("default", "min", "max"):
            object.__setattr__(self, key, _number(getattr(self, key), f"sigma.{key}"))
        if not 0 < self.min <= self.default <= self.max:
            raise _bad("sigma", f"needs 0 < min <= default <= max, got min={self.min}, "
                       f"default={self.default}, max={self.max}")


_REMOTE_KEYS = {"endpoint", "model", "version", "input", "output", "datatype", "output_kind", "range",
                "max_batch", "canaries", "canary_every", "canary_match", "timeout_seconds", "retries"}
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")
REMOTE_DATATYPES = ("FP32", "FP64", "FP16", "UINT8")


@dataclass(frozen=True, kw_only=True)
class RemoteSpec:
    """Where a remote base classifier is served (kind "remote"; smoothcert.remote): an Open
    Inference Protocol v2 endpoint, the model's name and version, its input and output
    tensors, the datatype and value range it takes, and how smoothcert talks to it."""

    endpoint: str  # http(s)://host[:port][/prefix]; checked against the operator's allow-list where used
    model: str
    version: str | None = None  # None: the unversioned route (servers without versions); canaries still pin
    input: str = "input"
    output: str = "output"
    datatype: str = "FP32"  # what the remote input takes: FP32, FP64, FP16 or UINT8
    output_kind: str = "logits"  # "logits" [B, K] or "class" [B]
    range: tuple[float, float] = (0.0, 1.0)  # the input range the remote expects, for [0, 1]
    max_batch: int = 256  # rows per request
    canaries: int = 8  # fixed canary inputs
    canary_every: int = 64  # batches between canary checks during a job (0: before and after only)
    canary_match: str = "bits"  # "bits": answers equal bit for bit; "classes": the same classes
    timeout_seconds: float = 30.0
    retries: int = 3  # of one batch, with the same bytes

    def __post_init__(self) -> None:
        put = lambda key, value: object.__setattr__(self, key, value)  # noqa: E731 (frozen)
        if not isinstance(self.endpoint, str) or not re.fullmatch(r"https?://[^\s]{1,2000}", self.endpoint):
            raise _bad("remote.endpoint", f"must be an http:// or https:// URL, got {self.endpoint!r}")
        for key in ("model", "input", "output"):
            if not isinstance(getattr(self, key), str) or not _TENSOR_NAME.fullmatch(getattr(self, key)):
                raise _bad(f"remote.{key}", f"must be 1-128 letters, digits or _.:/-, got {getattr(self, key)!r}")
        if self.version is not None and (not isinstance(self.version, str) or not _TENSOR_NAME.fullmatch(self.version)):
            raise _bad("remote.version", f"must be a string of 1-128 letters, digits or _.:/-, got {self.version!r}")
        if self.datatype not in REMOTE_DATATYPES:
            raise _bad("remote.datatype", f"must be one of {', '.join(REMOTE_DATATYPES)}, got {self.datatype!r}")
        if self.output_kind not in ("logits", "class"):
            raise _bad("remote.output_kind", f"must be 'logits' or 'class', got {self.output_kind!r}")
        if self.canary_match not in ("bits", "classes"):
            raise _bad("remote.canary_match", f"must be 'bits' or 'classes', got {self.canary_match!r}")
        low, high = (_number(v, "remote.range") for v in self.range) if isinstance(self.range, (list, tuple)) \
            and len(self.range) == 2 else (None, None)
        if low is None or not low < high:
            raise _bad("remote.range", f"must be [low, high] with low < high, got {self.range!r}")
        put("range", (low, high))
        _integer(self.max_batch, "remote.max_batch", 1, 65_536)
        _integer(self.canaries, "remote.canaries", 1, 64)
        _integer(self.canary_every, "remote.canary_every", 0, 1_000_000)
        _integer(self.retries, "remote.retries", 0, 10)
        timeout = _number(self.timeout_seconds, "remote.timeout_seconds")
        if not 0 < timeout <= 600:
            raise _bad("remote.timeout_seconds", f"must lie in (0, 600], got {timeout}")
        put("timeout_seconds", timeout)

    @classmethod
    def from_json(cls, obj: Any) -> RemoteSpec:
        obj = _keys(obj, "remote", _REMOTE_KEYS, {"endpoint", "model"})
        return cls(**obj)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["range"] = list(self.range)
        return out


@dataclass(frozen=True)
class SelectorSpec:
    """A σ selector's levels (kind "selector"; smoothcert.selector): the estimator, smoothed
    at `sigma_e`, picks one of `sigmas`; `experts` is "shared" (one classifier for every
    level: expert.*) or "per_sigma" (one per level, in order: expert0.*, expert1.*, …)."""

    sigmas: tuple[float, ...]
    sigma_e: float
    experts: str = "shared"

    def __post_init__(self) -> None:
        levels = self.sigmas
        if isinstance(levels, (str, bytes)) or not isinstance(levels, (list, tuple)):
            raise _bad("selector.sigmas", f"must be a list of noise levels, got {levels!r}")
        levels = tuple(_number(v, "selector.sigmas") for v in levels)
        if not 2 <= len(levels) <= MAX_LEVELS or len(set(levels)) != len(levels) or min(levels) <= 0:
            raise _bad("selector.sigmas", f"must hold 2 to {MAX_LEVELS} distinct positive levels, got {list(levels)}")
        object.__setattr__(self, "sigmas", levels)
        object.__setattr__(self, "sigma_e", _number(self.sigma_e, "selector.sigma_e"))
        if self.sigma_e <= 0:
            raise _bad("selector.sigma_e", f"must be positive, got {self.sigma_e}")
        if self.experts not in ("shared", "per_sigma"):
            raise _bad("selector.experts", f"must be 'shared' or 'per_sigma', got {self.experts!r}")

    @property
    def roles(self) -> list[str]:
        """The selector's network roles: the estimator, then the expert(s)."""
        if self.experts == "shared":
            return ["estimator", "expert"]
        return ["estimator", *(f"expert{i}" for i in range(len(self.sigmas)))]

    @classmethod
    def from_json(cls, obj: Any) -> SelectorSpec:
        obj = _keys(obj, "selector", {"sigmas", "sigma_e", "experts"}, {"sigmas", "sigma_e"})
        return cls(**obj)

    def to_json(self) -> dict[str, Any]:
        return {"sigmas": list(self.sigmas), "sigma_e": self.sigma_e, "experts": self.experts}


_SPEC_KEYS = {"name", "kind", "input_shape", "num_classes", "labels", "sigma", "normalize",
              "architecture", "architecture_args", "remote", "selector"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The validated content of `model.json`; construction checks every invariant."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    sigma: SigmaRange
    kind: str = "standard"
    labels: tuple[str, ...] | None = None  # None: str(i) for each class
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # (mean, std)
    architecture: str | None = None
    architecture_args: dict[str, Any] = field(default_factory=dict, hash=False)
    remote: RemoteSpec | None = None  # kind "remote": the served model
    selector: SelectorSpec | None = None  # kind "selector": the levels and the experts' layout

    def __post_init__(self) -> None:
        put = lambda key, value: object.__setattr__(self, key, value)  # noqa: E731 (frozen)
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise _bad("name", "must be 1-128 letters, digits, '.', '_' or '-' (used in URLs), "
                       f"starting with a letter or digit; got {self.name!r}")
        if self.kind not in KINDS:
            raise _bad("kind", f"must be one of {', '.join(map(repr, KINDS))}, got {self.kind!r}")
        if (self.kind == "remote") != (self.remote is not None):
            raise _bad("remote", "is required with kind 'remote' and refused otherwise")
        if (self.kind == "selector") != (self.selector is not None):
            raise _bad("selector", "is required with kind 'selector' and refused otherwise")
        if self.kind == "remote" and self.architecture is not None:
            raise _bad("architecture", "is refused with kind 'remote': the network is served elsewhere")
        shape = self.input_shape
        if not isinstance(shape, (list, tuple)) or len(shape) != 3:
            raise _bad("input_shape", f"must be [C, H, W], got {shape!r}")
        put("input_shape", tuple(_integer(s, "input_shape", 1, MAX_INPUT_ELEMENTS) for s in shape))
        if math.prod(self.input_shape) > MAX_INPUT_ELEMENTS:
            raise _bad("input_shape", f"has more than {MAX_INPUT_ELEMENTS} elements")
        if self.kind == "drs" and self.input_shape[2] % 2:
            raise _bad("input_shape", f"width must be even for kind 'drs', got {shape!r}")
        _integer(self.num_classes, "num_classes", 2, MAX_CLASSES)
        if not isinstance(self.sigma, SigmaRange):
            raise _bad("sigma", "must be a SigmaRange")
        if self.selector is not None and not all(self.sigma.min <= v <= self.sigma.max
                                                 for v in self.selector.sigmas):
            raise _bad("sigma", f"must span the selector's levels {list(self.selector.sigmas)}, "
                       f"got [{self.sigma.min}, {self.sigma.max}]")
        labels = self.labels
        if labels is None:
            labels = tuple(str(i) for i in range(self.num_classes))
        if isinstance(labels, str) or not all(isinstance(x, str) for x in labels):
            raise _bad("labels", "must be a list of strings")
        if len(labels) != self.num_classes or len(set(labels)) != len(labels):
            raise _bad("labels", f"must hold {self.num_classes} distinct strings (num_classes), "
                       f"got {len(labels)} with {len(set(labels))} distinct")
        put("labels", tuple(labels))
        if self.normalize is not None:
            mean, std = (tuple(_number(v, "normalize") for v in part) for part in self.normalize)
            if len(mean) != self.input_shape[0] or len(std) != self.input_shape[0]:
                raise _bad("normalize", f"needs one mean and one std per channel "
                           f"({self.input_shape[0]}), got {len(mean)} and {len(std)}")
            if any(s <= 0 for s in std):
                raise _bad("normalize", f"std must be positive, got {list(std)}")
            put("normalize", (mean, std))
        if self.architecture is not None and (not isinstance(self.architecture, str)
                                              or not self.architecture):
            raise _bad("architecture", f"must be a non-empty string, got {self.architecture!r}")
        if not isinstance(self.architecture_args, dict):
            raise _bad("architecture_args", "must be a JSON object")
        if self.architecture_args and self.architecture is None:
            raise _bad("architecture_args", "is only meaningful with 'architecture'")
        try:  # a private copy, and proof that to_json can write it
            put("architecture_args", json.loads(json.dumps(self.architecture_args)))
        except (TypeError, ValueError) as e:
            raise _bad("architecture_args", f"must be JSON-serialisable ({e})") from None

    @classmethod
    def from_json(cls, obj: Any) -> ModelSpec:
        """Parse model.json's object; any problem is a BundleError naming the field."""
        obj = _keys(obj, "model.json", _SPEC_KEYS, {"name", "input_shape", "num_classes"})
        selector = SelectorSpec.from_json(obj["selector"]) if obj.get("selector") is not None else None
        if "sigma" not in obj and selector is None:
            raise _bad("model.json", "lacks required key(s) ['sigma']")
        # A selector's σ range, when not given, is its levels' (the first is the default).
        sigma = obj.get("sigma") or {"default": selector.sigmas[0], "min": min(selector.sigmas),
                                     "max": max(selector.sigmas)}
        sigma = _keys(sigma, "sigma", {"default", "min", "max"}, {"default"})
        default = _number(sigma["default"], "sigma.default")
        labels = obj.get("labels")
        if labels is not None and not isinstance(labels, list):
            raise _bad("labels", "must be a list of strings")
        normalize = obj.get("normalize")
        if normalize is not None:
            normalize = _keys(normalize, "normalize", {"mean", "std"}, {"mean", "std"})
            if not all(isinstance(normalize[k], list) for k in ("mean", "std")):
                raise _bad("normalize", "mean and std must be lists of numbers")
            normalize = (normalize["mean"], normalize["std"])
        remote = obj.get("remote")
        return cls(
            name=obj["name"], kind=obj.get("kind", "standard"), input_shape=obj["input_shape"],
            num_classes=obj["num_classes"], labels=labels, normalize=normalize,
            sigma=SigmaRange(default, sigma.get("min", default), sigma.get("max", default)),
            architecture=obj.get("architecture"),
            architecture_args=obj.get("architecture_args", {}),
            remote=RemoteSpec.from_json(remote) if remote is not None else None,
            selector=selector,
        )

    def to_json(self) -> dict[str, Any]:
        """The model.json object; `ModelSpec.from_json(spec.to_json()) == spec`."""
        out: dict[str, Any] = {
            "name": self.name, "kind": self.kind, "input_shape": list(self.input_shape),
            "num_classes": self.num_classes, "labels": list(self.labels),
            "sigma": {"default": self.sigma.default, "min": self.sigma.min, "max": self.sigma.max},
        }
        if self.normalize is not None:
            out["normalize"] = {"mean": list(self.normalize[0]), "std": list(self.normalize[1])}
        if self.architecture is not None:
            out["architecture"] = self.architecture
            out["architecture_args"] = copy.deepcopy(self.architecture_args)
        if self.remote is not None:
            out["remote"] = self.remote.to_json()
        if self.selector is not None:
            out["selector"] = self.selector.to_json()
        return out

    @property
    def half_shape(self) -> tuple[int, int, int]:
        """(C, H, W/2): the input of each DRS half-network."""
        c, h, w = self.input_shape
        if w % 2:
            raise BundleError(f"input width {w} is odd: DRS needs an even width")
        return (c, h, w // 2)

    @property
    def network_shape(self) -> tuple[int, int, int]:
        """The per-image shape each network of the bundle takes."""
        return self.half_shape if self.kind == "drs" else self.input_shape

    @property
    def roles(self) -> list[str]:
        """The networks of the bundle by role, in file order (none for a remote model)."""
        return {"standard": ["model"], "drs": ["left", "right"], "remote": []}.get(self.kind) or self.selector.roles

    def outputs(self, role: str) -> int:
        """How many logits the network in `role` gives: a selector's estimator one per level."""
        return len(self.selector.sigmas) if role == "estimator" else self.num_classes
