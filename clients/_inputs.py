"""Turning what a user holds (a path, bytes, an array, a list, a bundle folder) into request parts.

`encode_input` gives the `input` object of docs/api.md: `{"image_b64"}` for PNG/JPEG,
`{"npy_b64"}` for .npy bytes and arrays, `{"tensor"}` for nested lists. Files and bytes are
sent as they are, never decoded: the server owns validation (channels, shape, alpha, EXIF
orientation), so the client cannot drift from it. A PIL image is sent as the PNG of the
image the server would decode from its file: its EXIF orientation applied here (PNG
encoding would drop the tag), its mode kept (a grey image stays one channel, alpha stays
for the server to judge). numpy and PIL are imported only when an array or a PIL image is
given.
"""

from __future__ import annotations

import base64
import io
import os
import stat
import zipfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

from clients._exceptions import InputError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

__all__ = ["BundleInput", "ImageInput", "bundle_zip", "encode_input", "sniff"]

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, "np.ndarray",
                   "Image.Image", Sequence[Any], Mapping[str, Any]]
BundleInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]

_MAGICS = ((b"\x89PNG\r\n\x1a\n", "image_b64"), (b"\xff\xd8\xff", "image_b64"),
           (b"\x93NUMPY", "npy_b64"))
_SUFFIXES = {".png": "image_b64", ".jpg": "image_b64", ".jpeg": "image_b64", ".npy": "npy_b64"}
INPUT_KEYS = frozenset({"image_b64", "npy_b64", "tensor"})
# PIL modes a PNG holds sample for sample; any other would be converted on the way.
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B"})


def sniff(data: bytes) -> str | None:
    """The `input` key for these bytes by their magic number, or None if unknown."""
    return next((key for magic, key in _MAGICS if data.startswith(magic)), None)


def encode_input(image: ImageInput) -> dict[str, Any]:
    """The request's `input` object for `image`.

    Paths are read and recognised by their content first (a JPEG named .png is still an
    image), then by suffix. Raises `InputError` for unreadable or unknown content and
    `TypeError` for a value of no supported kind.
    """
    if isinstance(image, (str, os.PathLike)):
        return _encode_path(os.fspath(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        key = sniff(data)
        if key is None:
            raise InputError(f"bytes starting {data[:8]!r} are not PNG, JPEG or .npy")
        return {key: _b64(data)}
    if isinstance(image, Mapping):  # already an `input` object: pass it through
        if len(image) == 1 and set(image) <= INPUT_KEYS:
            return dict(image)
        raise InputError(f"an input object has exactly one of {sorted(INPUT_KEYS)}")
    if _is_pil_image(image):
        return {"image_b64": _b64(_pil_png(image))}
    if hasattr(image, "__array__") or hasattr(image, "__array_interface__"):
        return {"npy_b64": _b64(_npy_bytes(image))}
    if isinstance(image, (list, tuple)):
        return {"tensor": image}
    raise TypeError(f"cannot send {type(image).__name__} as an image: give a path, bytes, "
                    "a numpy array or a nested list")


def _encode_path(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise InputError(f"cannot read {path!r}: {e.strerror or e}") from None
    key = sniff(data) or _SUFFIXES.get(os.path.splitext(path)[1].lower())
    if key is None:
        raise InputError(f"{path!r} is not a PNG, JPEG or .npy file")
    return {key: _b64(data)}


def _npy_bytes(array: Any) -> bytes:
    import numpy as np  # lazily: numpy is only needed when an array is given

    buf = io.BytesIO()
    try:
        # Arrays of objects would need pickle, which the server rightly refuses.
        np.save(buf, np.ascontiguousarray(np.asarray(array)), allow_pickle=False)
    except (TypeError, ValueError) as e:
        raise InputError(f"cannot encode the array as .npy: {e}") from None
    return buf.getvalue()


def _pil_png(image: Image.Image) -> bytes:
    from PIL import ImageOps  # lazily: a PIL image was given, so PIL is installed

    if image.mode not in _PNG_MODES:
        raise InputError(f"a PIL image in mode {image.mode} cannot be sent unchanged: PNG holds greyscale, "
                         "RGB, RGBA, palette and 16-bit greyscale images; convert it or send a numpy array")
    # The server turns a file by its EXIF orientation before anything else; an image opened
    # from such a file still holds the tag, which PNG encoding would lose.
    image = ImageOps.exif_transpose(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _is_pil_image(value: Any) -> bool:
    # Checked by module name so that PIL is never imported for a value that is not PIL's.
    return type(value).__module__.startswith("PIL.") and hasattr(value, "save")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def bundle_zip(source: BundleInput) -> tuple[str, bytes]:
    """(filename, zip bytes) for a bundle directory, .zip file or zip bytes.

    A directory is zipped in memory the way the server reads bundles: its top-level
    regular files (dot-files skipped, symlinks followed), sorted, with fixed timestamps so
    the same folder always gives the same bytes. Nothing is validated beyond that.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "bundle.zip", bytes(source)
    path = os.fspath(source)
    name = os.path.basename(os.path.normpath(path)) or "bundle"
    if os.path.isdir(path):
        return f"{name}.zip", _zip_directory(path)
    try:
        with open(path, "rb") as fh:
            return name, fh.read()
    except OSError as e:
        raise InputError(f"cannot read bundle {path!r}: {e.strerror or e}") from None


def _zip_directory(path: str) -> bytes:
    entries = sorted((e for e in os.scandir(path) if e.is_file() and not e.name.startswith(".")),
                     key=lambda e: e.name)
    if not entries:
        raise InputError(f"bundle directory {path!r} holds no files")
    out = io.BytesIO()
    # Stored, not deflated: weights barely compress and deflating large ones takes seconds.
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for entry in entries:
            info = zipfile.ZipInfo(entry.name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            with open(entry.path, "rb") as fh:
                zf.writestr(info, fh.read())
    return out.getvalue()
