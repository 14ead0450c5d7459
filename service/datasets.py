"""Datasets uploaded for an evaluation, decoded into the one form the workers read: an `.npz`
with `x` float32 `[N, C, H, W]` in [0, 1] (exactly the model's input shape) and `y` int64
labels in [0, num_classes).

Accepted: an `.npz` (`x`, `y`, or `x_test`, `y_test`; uint8 or floats in [0, 1]; `[N, H, W]`
for one channel), or a zip of class folders (`<label>/<image>.png|.jpg`, optionally under one
top folder) whose folder names are the model's labels. Decoding is `smoothcert.imageio`'s, so
corrupt images, NaN, values outside [0, 1], too many pixels and wrong shapes are refused with
a 4xx. Nothing is resized. Zip members are read with size limits; nothing touches the disk.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import zipfile
from typing import Any

import numpy as np

from service.config import Settings
from service.errors import InvalidInput
from smoothcert.imageio import ImageError, decode_image_for, to_unit_float
from smoothcert.manifest import ModelSpec

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def dataset_input(params: Any, upload: bytes | None, spec: ModelSpec, settings: Settings) -> bytes:
    """The stored input of an evaluation: the uploaded file or the JSON `dataset_b64`."""
    if upload is None:
        try:
            upload = base64.b64decode(params.dataset_b64, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput("dataset_b64: not valid base64") from None
    x, y = decode_dataset(upload, spec, max_examples=settings.max_evaluation_examples,
                          max_pixels=settings.max_pixels)
    if params.limit is not None:
        x, y = x[: params.limit * params.every], y[: params.limit * params.every]
    out = io.BytesIO()
    np.savez(out, x=x, y=y)
    return out.getvalue()


def decode_dataset(data: bytes, spec: ModelSpec, *, max_examples: int,
                   max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) checked against the model; InvalidInput (422) says what is wrong."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            if names and all(n.endswith(".npy") for n in names):
                x, y = _npz(data, zf, spec, max_examples)
            else:
                x, y = _class_folders(zf, spec, max_examples, max_pixels)
    except zipfile.BadZipFile:
        raise InvalidInput("dataset: not an .npz or a zip of class folders") from None
    except ImageError as exc:
        raise InvalidInput(f"dataset: {exc}") from None
    if len(x) == 0:
        raise InvalidInput("dataset: holds no examples")
    if len(x) > max_examples:
        raise InvalidInput(f"dataset: {len(x)} examples, more than the limit of {max_examples} "
                           "(setting max_evaluation_examples)")
    shape = tuple(spec.input_shape)
    if tuple(x.shape[1:]) != shape:
        raise InvalidInput(f"dataset: images have shape {tuple(x.shape[1:])} but the model takes {shape}")
    if y.min() < 0 or y.max() >= spec.num_classes:
        raise InvalidInput(f"dataset: labels must lie in [0, {spec.num_classes}), got {int(y.min())}..{int(y.max())}")
    return x, y


def _declared(zf: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from an .npz member's header, read before numpy allocates what it claims."""
    try:
        with zf.open(name) as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(fh)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError, zipfile.BadZipFile) as exc:
        raise InvalidInput(f"dataset: corrupt .npz member {name} ({exc})") from None
    return tuple(shape), dtype


def _npz(data: bytes, zf: zipfile.ZipFile, spec: ModelSpec, max_examples: int) -> tuple[np.ndarray, np.ndarray]:
    # A small compressed .npz can claim terabytes (a decompression bomb): its headers are
    # checked against the limit and the model before any array is read.
    keys = {n.removesuffix(".npy") for n in zf.namelist()}
    xk, yk = ("x_test", "y_test") if {"x_test", "y_test"} <= keys else ("x", "y")
    if not {xk, yk} <= keys:
        raise InvalidInput("dataset: an .npz needs arrays x and y (or x_test, y_test); "
                           f"it holds {sorted(keys)}")
    for key, per_example in ((xk, math.prod(spec.input_shape)), (yk, 1)):
        shape, dtype = _declared(zf, f"{key}.npy")
        if shape and shape[0] > max_examples:
            raise InvalidInput(f"dataset: {shape[0]} examples, more than the limit of {max_examples} "
                               "(setting max_evaluation_examples)")
        if math.prod(shape[1:]) != per_example or dtype.kind not in "biuf" or dtype.itemsize > 8:
            raise InvalidInput(f"dataset: {key} has shape {shape} and dtype {dtype}, which do not fit the "
                               f"model's input shape {tuple(spec.input_shape)} (x) or labels (y)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            x, y = archive[xk], archive[yk]
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidInput(f"dataset: corrupt .npz ({exc})") from None
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or y.dtype.kind not in "iu":
        raise InvalidInput("dataset: x must be [N, C, H, W] and y N integer labels, "
                           f"got {x.shape} and {y.shape} {y.dtype}")
    return to_unit_float(x, "dataset x"), y.astype(np.int64)


def _class_folders(zf: zipfile.ZipFile, spec: ModelSpec, max_examples: int,
                   max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    members = [i for i in zf.infolist() if not i.is_dir() and i.filename.lower().endswith(_IMAGE_SUFFIXES)
               and not i.filename.startswith("__MACOSX/")]
    if len(members) > max_examples:
        raise InvalidInput(f"dataset: {len(members)} images, more than the limit of {max_examples}")
    parts = [m.filename.split("/") for m in members]
    if parts and all(len(p) == 3 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]  # zip -r data.zip folder/ puts everything under folder/
    if not parts or any(len(p) != 2 for p in parts):
        raise InvalidInput("dataset: a zip of class folders holds <label>/<image>.png|.jpg members")
    labels = {label: i for i, label in enumerate(spec.labels)}
    unknown = sorted({p[0] for p in parts} - set(labels))
    if unknown:
        raise InvalidInput(f"dataset: folders {unknown[:5]} are not labels of the model ({list(spec.labels)[:10]})")
    per_image = 8 * max_pixels  # a PNG/JPEG of max_pixels pixels compresses well below this
    xs, ys = [], []
    for info, (label, _) in zip(members, parts, strict=True):
        if info.file_size > per_image:
            raise InvalidInput(f"dataset: {info.filename} is larger than {per_image} bytes")
        with zf.open(info) as fh:
            data = fh.read(per_image + 1)
        try:
            xs.append(decode_image_for(data, spec.input_shape, model=spec.name, max_pixels=max_pixels))
        except ImageError as exc:  # the file's name first: a dataset holds many images
            raise ImageError(f"{info.filename}: {exc}") from None
        ys.append(labels[label])
    return np.stack(xs), np.asarray(ys, dtype=np.int64)
