"""Decoding of user inputs (PNG, JPEG, .npy, .npz, JSON tensors) into model inputs.

Every decoder returns a float32 array `[C, H, W]` (or `[H, W]` before `check_shape`) whose
values are finite and lie in [0, 1], or raises `ImageError` with a message meant for the user.
Nothing is resized, renormalised or converted between greyscale and colour: a certificate is
a statement about the model's own input space, so the input must already be in it. One rule
for channels, whatever the format: an image keeps the channels its file holds, and a count
other than the model's is refused (`decode_image_for`, `check_shape`), never converted.
Every image decoded by the API, the CLI and the training data loader goes through here.

Imports only numpy, PIL and the standard library (never torch): the HTTP API process uses
this module and stays torch-free.
"""

from __future__ import annotations

import io
import math
import numbers
import struct
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "MAX_PIXELS",
    "ImageError",
    "InputItem",
    "check_shape",
    "decode_image",
    "decode_image_for",
    "decode_npy",
    "encode_png",
    "from_nested",
    "to_unit_float",
    "load_inputs",
]

# Largest width×height accepted by default: checked from the header, before any pixel is
# decoded, so a small file claiming a huge image (a decompression bomb) costs nothing.
MAX_PIXELS = 4096 * 4096

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_NPY_MAGIC = b"\x93NUMPY"
# Only to name what was sent in the refusal message; none of these is decoded.
_OTHER_MAGICS = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"), (b"RIFF", "RIFF/WebP"), (_NPY_MAGIC, "a NumPy .npy array"),
    (b"PK\x03\x04", "a zip archive (.npz?)"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)
_ACCEPTED_IMAGES = "PNG or JPEG"
_ACCEPTED_DTYPES = "uint8 (0-255) or float16/float32/float64 (in [0, 1])"
# PIL modes holding one 16-bit grey channel: converting them to "L" would clip, not scale.
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
# The 8-bit modes a PNG or JPEG decodes to, by the names errors give them.
_EIGHT_BIT_MODES = {"1": "1-bit greyscale", "L": "greyscale", "LA": "greyscale+alpha",
                    "RGB": "RGB", "RGBA": "RGBA"}


class ImageError(ValueError):
    """An input refused by this module; the message says why, for the user."""


@dataclass(frozen=True, eq=False)
class InputItem:
    """One input of a CLI run: a display name, the model input and an optional label.

    `array` is float32 `[C, H, W]` in [0, 1] with exactly the model's input shape.
    """

    name: str
    array: np.ndarray
    label: int | None = None


# --------------------------------------------------------------------------- images


def decode_image(
    data: bytes, *, channels: int | None = None, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Decode a PNG or JPEG into float32 `[C, H, W]` in [0, 1], with the file's own channels.

    The EXIF orientation (JPEG and PNG) is applied first. Then: greyscale (1-, 8- or 16-bit)
    gives 1 channel, RGB 3; a palette image gives the mode of its palette (RGB, so 3 channels,
    even when every colour in it is grey). Alpha (an RGBA or LA image, a transparent palette
    entry or tRNS colour key) is refused unless every pixel is fully opaque, and then dropped.
    8-bit samples are divided by 255 and 16-bit greyscale samples by 65535, in float32: each
    value is the float32 nearest the exact quotient. Refused as well: CMYK, 16-bit colour or alpha PNGs (PIL
    keeps only their top 8 bits), other formats, more than `max_pixels` pixels (checked from
    the header, before decoding; PIL's own decompression-bomb limit is reported the same
    way), truncated or corrupt files.

    `channels`: when given, an image with another channel count is refused, naming its
    mode and size; nothing is ever converted.
    """
    array, mode = _decode(data, max_pixels)
    if channels is not None and array.shape[0] != channels:
        raise ImageError(f"{_describe(array, mode)}; expected {channels} {_plural(channels, 'channel')}; "
                         "images are never converted between greyscale and colour")
    return array


def decode_image_for(
    data: bytes, input_shape: Sequence[int], *, model: str | None = None,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """`decode_image` checked against a model's `input_shape` (C, H, W): exactly that shape or
    ImageError, whose message names the image's real mode and size and the model's shape,
    e.g. "the image is RGB 32×32 (H×W, 3 channels); model 'digits' takes 1×8×8 (C×H×W)"."""
    expected = tuple(int(s) for s in input_shape)
    array, mode = _decode(data, max_pixels)
    if array.shape != expected:
        who = f"model {model!r}" if model else "the model"
        raise ImageError(f"{_describe(array, mode)}; {who} takes {'×'.join(map(str, expected))} "
                         "(C×H×W); images are never resized or converted")
    return array


def _describe(array: np.ndarray, mode: str) -> str:
    c, h, w = array.shape
    return f"the image is {mode} {h}×{w} (H×W, {c} {_plural(c, 'channel')})"


def _plural(count: int, word: str) -> str:
    return word if count == 1 else f"{word}s"


def _decode(data: bytes, max_pixels: int) -> tuple[np.ndarray, str]:
    """(float32 `[C, H, W]`, the name of the file's mode as users know it)."""
    data = bytes(data)
    if data.startswith(_PNG_MAGIC):
        fmt = "PNG"
    elif data.startswith(_JPEG_MAGIC):
        fmt = "JPEG"
    else:
        raise ImageError(
            f"unsupported image format ({_sniff(data)}): accepted formats are {_ACCEPTED_IMAGES}"
        )
    try:
        # PIL warns (and errors at twice its limit) about decompression bombs; a warning
        # would let the file through, so it becomes an exception here. catch_warnings swaps
        # a process-wide filter list, so under threads this is best effort: the guarantee is
        # the explicit max_pixels check below, which needs no warning machinery.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])  # reads the header only
            width, height = image.size
            if width <= 0 or height <= 0:
                raise ImageError(f"{fmt} header gives an empty image ({width}×{height})")
            if width * height > max_pixels:
                raise ImageError(
                    f"image is {width}×{height} = {width * height} pixels, more than the "
                    f"{max_pixels} accepted"
                )
            # Read before decoding: PIL reduces 16-bit colour and alpha samples to their top
            # byte (and 16-bit grey+alpha to RGBA) without a word.
            raw = image.tile[0][3] if image.tile else None
            if isinstance(raw, str) and raw.endswith(";16B") and not raw.startswith("I;16"):
                raise ImageError(
                    f"16-bit {_EIGHT_BIT_MODES.get(raw[:-4], raw[:-4])} PNGs are refused (they would lose "
                    "their low 8 bits): "
                    "save 8 bits per channel, 16-bit greyscale, or send the pixels as .npy"
                )
            image.load()  # decodes the pixels: truncation and corruption surface here
            # Orientation first: every later step (and the shape check) sees the image the
            # way its EXIF says it is shown.
            ImageOps.exif_transpose(image, in_place=True)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError(f"corrupt or truncated {fmt} file: its header cannot be read") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError,
            struct.error) as exc:
        # PIL reports bad data with any of these (SyntaxError: "broken PNG file", ...).
        raise ImageError(f"corrupt or truncated {fmt} file: {exc}") from None
    return _pixels(image)


def _pixels(image: Image.Image) -> tuple[np.ndarray, str]:
    """The decoded image as float32 `[C, H, W]` with its own channels, and its mode's name."""
    mode, key = image.mode, image.info.get("transparency")
    if mode in _WIDE_GREY_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageError(f"{mode} image holds values outside the 16-bit range")
        if isinstance(key, int) and (count := int(np.count_nonzero(values == key))):
            raise _transparent("16-bit greyscale", values.shape, count)
        # Integers up to 65535 are exact in float32, and IEEE division rounds once: each
        # sample is the float32 nearest v/65535 (as 8-bit ones are the nearest v/255).
        return values.astype(np.float32)[None] / np.float32(65535.0), "16-bit greyscale"
    if mode in ("P", "PA"):
        # A palette image is an image of its palette's mode (RGB for PNG, even when every
        # entry is grey), with alpha when the file marks an entry transparent.
        base = "L" if image.palette is not None and image.palette.mode.startswith("L") else "RGB"
        alpha = mode == "PA" or key is not None or (image.palette is not None and "A" in image.palette.mode)
        name = f"{_EIGHT_BIT_MODES[base]} palette"
        image = image.convert(base + "A" if alpha else base)
    elif mode in _EIGHT_BIT_MODES:
        name = _EIGHT_BIT_MODES[mode]
        if mode in ("1", "L", "RGB") and key is not None:
            # A tRNS colour key: pixels of that value are transparent, so the alpha rule holds.
            image = image.convert("RGBA" if mode == "RGB" else "LA")
        elif mode == "1":
            image = image.convert("L")  # 0/255 samples, not booleans
    else:
        raise ImageError(
            f"{mode} images are refused: send greyscale, RGB, or RGBA with every pixel opaque"
            + (" (convert CMYK to RGB with its colour profile first)" if mode == "CMYK" else "")
        )
    pixels = np.asarray(image, dtype=np.uint8)
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    if image.mode in ("LA", "RGBA"):
        if count := int(np.count_nonzero(pixels[..., -1] != 255)):
            raise _transparent(name, pixels.shape[:2], count)
        pixels = pixels[..., :-1]  # fully opaque: the alpha channel says nothing
        if mode in ("LA", "RGBA"):
            name = f"opaque {name}"
    array = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)
    return array, name


def _transparent(name: str, size: Sequence[int], count: int) -> ImageError:
    return ImageError(
        f"the image is {name} {size[0]}×{size[1]} with {count} transparent or translucent "
        f"{_plural(count, 'pixel')}: alpha is refused unless every pixel is opaque (flatten the "
        "image onto a background first)"
    )


def _sniff(data: bytes) -> str:
    if not data:
        return "empty input"
    for magic, name in _OTHER_MAGICS:
        if data.startswith(magic):
            return name
    return f"unrecognised leading bytes {data[:8]!r}"


def encode_png(array: np.ndarray) -> bytes:
    """Encode `[C, H, W]` (C = 1 or 3) or `[H, W]` as an 8-bit PNG.

    Floats must be finite and in [0, 1]; they are rounded to the nearest of 256 levels, so
    `decode_image(encode_png(u8 / 255))` gives back `u8 / 255` exactly. uint8 is taken as is.
    """
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[0] not in (1, 3):
        raise ImageError(f"PNG encoding takes [1|3, H, W] or [H, W], got shape {a.shape}")
    if a.dtype != np.uint8:
        a = to_unit_float(a, "array")
        a = np.rint(a.astype(np.float64) * 255.0).astype(np.uint8)
    if a.shape[0] == 1:
        image = Image.fromarray(np.ascontiguousarray(a[0]), mode="L")
    else:
        image = Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0)), mode="RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# --------------------------------------------------------------------------- arrays


def decode_npy(data: bytes, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode a `.npy` file holding `[H, W]` or `[C, H, W]` into float32 `[C, H, W]` in [0, 1].

    Never unpickles. Accepts uint8 (divided by 255) and float16/32/64 (finite, in [0, 1]);
    refuses bool, other integer types and anything else, naming the problem.
    """
    array = to_unit_float(_load_npy(bytes(data), max_pixels), "array")
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ImageError(f"array has shape {array.shape}: expected [H, W] or [C, H, W]")
    return array


def _load_npy(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The raw array of a `.npy` file, any shape, its header checked before its data is read.

    The header must describe exactly the bytes that follow it, so a short file claiming a
    huge shape is refused instead of allocated.
    """
    if not data.startswith(_NPY_MAGIC):
        raise ImageError(f"not a .npy file ({_sniff(data)})")
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        else:
            # 2.0 and 3.0 share the layout (3.0 only allows utf-8 field names).
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise ImageError(f"corrupt .npy header: {exc}") from None
    _check_dtype(dtype)
    if len(shape) >= 2 and shape[-1] * shape[-2] > max_pixels:
        raise ImageError(
            f"array has shape {shape}: {shape[-2]}×{shape[-1]} is more than the "
            f"{max_pixels} pixels accepted"
        )
    expected = math.prod(shape) * dtype.itemsize
    present = len(data) - fp.tell()
    if present != expected:
        raise ImageError(
            f"truncated or corrupt .npy: header promises {expected} bytes of data for shape "
            f"{shape}, file holds {present}"
        )
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ImageError(f"corrupt .npy file: {exc}") from None
    return array


def _check_dtype(dtype: np.dtype) -> None:
    if dtype == np.uint8 or (dtype.kind == "f" and dtype.itemsize in (2, 4, 8)):
        return
    if dtype.kind == "b":
        raise ImageError(f"bool arrays are refused: send {_ACCEPTED_DTYPES}")
    if dtype.kind in "iu":
        raise ImageError(
            f"{dtype.name} arrays are refused (of the integer types only uint8 has a known "
            f"pixel scale): send {_ACCEPTED_DTYPES}"
        )
    raise ImageError(f"dtype {dtype} is refused: send {_ACCEPTED_DTYPES}")


def to_unit_float(array: np.ndarray, what: str) -> np.ndarray:
    """`array` as float32 in [0, 1]: uint8 divided by 255, floats checked, all else refused."""
    _check_dtype(array.dtype)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0)
    # Checked in the source precision: a float64 1e300 must be reported, not cast to inf.
    finite = np.isfinite(array)
    if not finite.all():
        nan = int(np.isnan(array).sum())
        inf = int(array.size - finite.sum()) - nan
        parts = [f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else ""]
        raise ImageError(f"{what} holds {' and '.join(p for p in parts if p)} values")
    if array.size:
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ImageError(
                f"{what} values must lie in [0, 1], got min {low:g} and max {high:g} "
                "(scale 0-255 pixels by 1/255; normalisation belongs inside the model)"
            )
    return np.ascontiguousarray(array, dtype=np.float32)


def from_nested(values: object, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A JSON "tensor" (nested lists `[H][W]` or `[C][H][W]` of numbers) as float32 `[C, H, W]`.

    JSON does not tell 0 from 0.0 (JavaScript writes 1.0 as 1), so every number, integer or
    not, is a value in [0, 1]; there is no 0-255 reading. Ragged lists, booleans, strings and
    nulls are refused, as are NaN, infinities and values outside [0, 1].
    """
    shape = _nested_shape(values)
    if len(shape) not in (2, 3):
        raise ImageError(
            f"tensor has {len(shape)} dimensions {tuple(shape)}: expected [H][W] or [C][H][W]"
        )
    if shape[-1] * shape[-2] > max_pixels:
        raise ImageError(
            f"tensor is {shape[-2]}×{shape[-1]}, more than the {max_pixels} pixels accepted"
        )
    _check_nested(values, shape, ())
    try:
        array = np.array(values, dtype=np.float64)
    except (OverflowError, ValueError, TypeError) as exc:
        raise ImageError(f"tensor holds a value that is not a usable number: {exc}") from None
    array = to_unit_float(array, "tensor")
    return array[None] if array.ndim == 2 else array


def _nested_shape(values: object) -> list[int]:
    """The shape implied by the first element at every level (checked in full afterwards)."""
    shape: list[int] = []
    node = values
    while isinstance(node, (list, tuple)):
        if not node:
            raise ImageError(f"tensor has an empty list at depth {len(shape)}")
        shape.append(len(node))
        if len(shape) > 3:
            break
        node = node[0]
    if not shape:
        raise ImageError(f"tensor must be nested lists of numbers, got {type(values).__name__}")
    return shape


def _check_nested(node: object, shape: Sequence[int], index: tuple[int, ...]) -> None:
    depth = len(index)
    if not isinstance(node, (list, tuple)) or len(node) != shape[depth]:
        found = (
            f"a list of {len(node)}" if isinstance(node, (list, tuple))
            else f"a {type(node).__name__}"
        )
        raise ImageError(
            f"ragged tensor: element {list(index)} is {found}, expected a list of "
            f"{shape[depth]}"
        )
    if depth + 1 < len(shape):
        for i, child in enumerate(node):
            _check_nested(child, shape, (*index, i))
        return
    for i, leaf in enumerate(node):
        kind = type(leaf)
        # Fast path for what json.loads produces; bool is an int subclass and is refused.
        if kind is float or kind is int:
            continue
        if isinstance(leaf, (bool, np.bool_)) or not isinstance(leaf, numbers.Real):
            raise ImageError(
                f"tensor element {[*index, i]} is {leaf!r} ({kind.__name__}), not a number"
            )


def check_shape(array: np.ndarray, input_shape: Sequence[int]) -> np.ndarray:
    """`array` as contiguous float32 `[C, H, W]` equal to `input_shape`, else ImageError.

    A `[H, W]` array is accepted when C == 1. Nothing is resized or converted: a certificate
    holds in the model's own input space. Takes decoded (float) arrays only.
    """
    expected = tuple(int(s) for s in input_shape)
    a = np.asarray(array)
    if a.dtype.kind != "f":
        raise ImageError(f"expected a decoded float image, got dtype {a.dtype}")
    if a.ndim == 2 and len(expected) == 3 and expected[0] == 1:
        a = a[None]
    if tuple(a.shape) != expected:
        hint = ""
        if a.ndim == len(expected) == 3 and a.shape[1:] == expected[1:]:
            hint = f" (it has {a.shape[0]} channels, the model {expected[0]})"
        raise ImageError(
            f"image has shape {tuple(a.shape)} but the model takes {expected}{hint}; "
            "inputs are never resized"
        )
    return np.ascontiguousarray(a, dtype=np.float32)


# --------------------------------------------------------------------------- CLI files

_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


def load_inputs(
    paths: Iterable[str | PathLike[str]], input_shape: Sequence[int], *, model: str | None = None
) -> list[InputItem]:
    """Read the CLI's input files into items of exactly `input_shape` (C, H, W).

    `.png/.jpg/.jpeg`: one item, decoded by `decode_image_for` (its own channels, which must
    be the model's; `model` names the model in the refusal).
    `.npy`: one item, or N items from `[N, C, H, W]` (or `[N, H, W]` when C == 1).
    `.npz`: items from array `x` (one image or a batch), labels from `y` when present (one
    non-negative integer per item). Items of a batch are named `file[i]`.
    Any unreadable file, other extension or mismatched shape raises ImageError.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise ImageError(f"input_shape must be (C, H, W), got {shape}")
    items: list[InputItem] = []
    for raw in paths:
        path = Path(raw)
        suffix = path.suffix.lower()
        if suffix not in _IMAGE_SUFFIXES | {".npy", ".npz"}:
            raise ImageError(
                f"{path}: unsupported file type {suffix or '(none)'}; accepted: .png, .jpg, "
                ".jpeg, .npy, .npz"
            )
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            if suffix in _IMAGE_SUFFIXES:
                items.append(InputItem(path.name, decode_image_for(data, shape, model=model)))
            elif suffix == ".npy":
                items.extend(_batch_items(path.name, _load_npy(data), None, shape, False))
            else:
                x, y = _read_npz(data)
                items.extend(_batch_items(path.name, x, y, shape, True))
        except ImageError as exc:
            raise ImageError(f"{path}: {exc}") from None
    return items


def _read_npz(data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    if not data.startswith(b"PK"):
        raise ImageError(f"not an .npz archive ({_sniff(data)})")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            if "x" not in archive.files:
                raise ImageError(
                    f".npz must hold an array named 'x' (and optionally 'y'); it holds "
                    f"{sorted(archive.files)}"
                )
            x = archive["x"]
            y = archive["y"] if "y" in archive.files else None
    except ImageError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise ImageError(f"corrupt .npz file: {exc}") from None
    return x, y


def _batch_items(
    name: str,
    array: np.ndarray,
    labels: np.ndarray | None,
    shape: tuple[int, ...],
    always_index: bool,
) -> list[InputItem]:
    """Split `array` (one input or a batch of them) into items; attach `labels` if given."""
    array = to_unit_float(array, "array")
    c, h, w = shape
    if array.shape == shape or (c == 1 and array.shape == (h, w)):
        batch = array.reshape((1, *shape))
        single = True
    elif array.ndim == 4 and array.shape[1:] == shape:
        batch, single = array, False
    elif c == 1 and array.ndim == 3 and array.shape[1:] == (h, w):
        batch, single = array[:, None], False
    else:
        raise ImageError(
            f"array has shape {array.shape} but the model takes {shape} "
            f"(or a batch [N, {c}, {h}, {w}]); inputs are never resized"
        )
    count = batch.shape[0]
    label_list: list[int | None] = [None] * count
    if labels is not None:
        label_list = list(_labels(labels, count))
    names = (
        [name] if single and not always_index else [f"{name}[{i}]" for i in range(count)]
    )
    return [
        InputItem(names[i], np.ascontiguousarray(batch[i], dtype=np.float32), label_list[i])
        for i in range(count)
    ]


def _labels(y: np.ndarray, count: int) -> list[int]:
    y = np.asarray(y)
    if y.dtype.kind not in "iu":
        raise ImageError(f"labels 'y' must be integers, got dtype {y.dtype}")
    y = y.reshape(-1)
    if y.size != count:
        raise ImageError(f"'y' holds {y.size} labels for {count} inputs in 'x'")
    if y.size and int(y.min()) < 0:
        raise ImageError(f"labels must be ≥ 0, got {int(y.min())}")
    return [int(v) for v in y]
