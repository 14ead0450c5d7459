"""The request's input decoded into what the worker reads: float32 `[C, H, W]` in [0, 1]
with exactly the model's input shape, saved with `np.save`.

Accepted: a JSON `input` (`image_b64`: PNG/JPEG, or .npy sniffed; `tensor`: nested lists;
`npy_b64`), a multipart `image` file (PNG/JPEG/NPY, sniffed), or an Open Inference Protocol
tensor. Decoding is `smoothcert.imageio`'s, so the API refuses what the engine (and the
CLI) would: corrupt files, NaN, values outside [0, 1], too many pixels, the wrong shape, and
a channel count other than the model's, whatever the format (an image keeps its file's
channels; nothing is converted or resized).

`input_sha256` names the decoded input: the SHA-256 of the stored array's bytes, so a result
says which pixels were certified even where JPEG decoders disagree.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
from collections.abc import Sequence

import numpy as np

from service.errors import InvalidInput
from service.schemas import ImageInput
from smoothcert.imageio import (
    ImageError,
    check_shape,
    decode_image_for,
    decode_npy,
    from_nested,
)
from smoothcert.manifest import ModelSpec

_NPY_MAGIC = b"\x93NUMPY"


def _save(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def to_npy(array: np.ndarray) -> bytes:
    """What the worker reads: float32 `[C, H, W]`, as `np.save` writes it."""
    return _save(np.ascontiguousarray(array, dtype=np.float32))


def input_sha256(stored: bytes) -> str:
    """The hex SHA-256 of a stored input's array: its float32 little-endian bytes in C order
    (`[C, H, W]`), exactly the data `to_npy` wrote. The job's request keeps it as
    `input_sha256`."""
    array = np.load(io.BytesIO(stored), allow_pickle=False)
    return hashlib.sha256(np.ascontiguousarray(array, dtype="<f4").tobytes(order="C")).hexdigest()


def _b64(text: str, field: str) -> bytes:
    if text.startswith("data:") and "," in text:  # a data URL: data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"input.{field}: not valid base64") from None


def _file(data: bytes, spec: ModelSpec, max_pixels: int) -> np.ndarray:
    if data.startswith(_NPY_MAGIC):
        return decode_npy(data, max_pixels=max_pixels)
    return decode_image_for(data, spec.input_shape, model=spec.name, max_pixels=max_pixels)


def decode_input(source: ImageInput | bytes, spec: ModelSpec, *, max_pixels: int) -> bytes:
    """The npy bytes of a JSON `input` or of an uploaded file; InvalidInput says why not."""
    where = "image" if isinstance(source, bytes) else "input"
    try:
        if isinstance(source, bytes):
            array = _file(source, spec, max_pixels)
        elif source.tensor is not None:
            where = "input.tensor"
            array = from_nested(source.tensor, max_pixels=max_pixels)
        elif source.image_b64 is not None:
            where = "input.image_b64"
            array = _file(_b64(source.image_b64, "image_b64"), spec, max_pixels)
        else:
            where = "input.npy_b64"
            array = decode_npy(_b64(source.npy_b64 or "", "npy_b64"), max_pixels=max_pixels)
        return to_npy(check_shape(array, spec.input_shape))
    except ImageError as exc:
        raise InvalidInput(f"{where}: {exc}") from None


def decode_tensor(data: Sequence[float], shape: Sequence[int], datatype: str, spec: ModelSpec,
                  *, max_pixels: int) -> bytes:
    """An Open Inference Protocol tensor (flat row-major data; a leading batch of 1 allowed)."""
    shape = list(shape)
    if len(shape) == 4:
        if shape[0] != 1:
            raise InvalidInput(f"inputs[0].shape: one image per request, got a batch of {shape[0]}")
        shape = shape[1:]
    if math.prod(shape) != len(data):
        raise InvalidInput(f"inputs[0]: shape {shape} holds {math.prod(shape)} values, data has {len(data)}")
    array = np.asarray(data, dtype=np.float64).reshape(shape)
    if datatype == "UINT8":
        if not np.all((array >= 0) & (array <= 255) & (array == np.floor(array))):
            raise InvalidInput("inputs[0].data: UINT8 values must be integers in [0, 255]")
        array = array.astype(np.uint8)
    try:  # through decode_npy: the same dtype, finiteness, range and size checks as a file
        decoded = decode_npy(_save(array), max_pixels=max_pixels)
        return to_npy(check_shape(decoded, spec.input_shape))
    except ImageError as exc:
        raise InvalidInput(f"inputs[0]: {exc}") from None

