"""smoothcert.imageio: decoding of user inputs, and every way of refusing them."""

from __future__ import annotations

import io
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from smoothcert.imageio import (
    MAX_PIXELS,
    ImageError,
    InputItem,
    check_shape,
    decode_image,
    decode_image_for,
    decode_npy,
    encode_png,
    from_nested,
    load_inputs,
)

REPO = Path(__file__).resolve().parents[2]


def _u8(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _pil_bytes(array_hwc: np.ndarray, fmt: str, **save) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array_hwc).save(out, format=fmt, **save)
    return out.getvalue()


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=True)
    return out.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload)) + kind + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width×height, with a few bytes of IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- torch-free


def test_import_does_not_load_torch():
    code = "import smoothcert.imageio, sys; assert 'torch' not in sys.modules, 'torch loaded'"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- images


def test_png_grey_round_trip():
    pixels = _u8((7, 5))
    out = decode_image(_pil_bytes(pixels, "PNG"))
    assert out.dtype == np.float32 and out.shape == (1, 7, 5)
    np.testing.assert_array_equal(out[0], pixels.astype(np.float32) / np.float32(255))


def test_png_rgb_round_trip():
    pixels = _u8((6, 4, 3))
    out = decode_image(_pil_bytes(pixels, "PNG"))
    assert out.dtype == np.float32 and out.shape == (3, 6, 4)
    np.testing.assert_array_equal(out, pixels.transpose(2, 0, 1) / np.float32(255))


def _png(image: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **save)
    return out.getvalue()


def _png_raw(width: int, height: int, depth: int, colour_type: int, rows: np.ndarray) -> bytes:
    """A PNG written by hand (filter 0 on every row): for layouts PIL cannot save."""
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw))
            + _png_chunk(b"IEND", b""))


def test_channels_are_the_files_own():
    rgb, grey = _u8((4, 5, 3)), _u8((4, 5))
    assert decode_image(_pil_bytes(rgb, "PNG")).shape == (3, 4, 5)
    assert decode_image(_pil_bytes(grey, "PNG")).shape == (1, 4, 5)
    np.testing.assert_array_equal(decode_image(_pil_bytes(grey, "PNG"), channels=1)[0], grey / np.float32(255))


@pytest.mark.parametrize(("pixels", "channels", "match"), [
    (_u8((4, 5, 3)), 1, r"^the image is RGB 4×5 \(H×W, 3 channels\); expected 1 channel; "),
    (_u8((4, 5)), 3, r"^the image is greyscale 4×5 \(H×W, 1 channel\); expected 3 channels; "),
    (_u8((4, 5, 3)), 4, "expected 4 channels"),
])
def test_a_channel_mismatch_is_refused_never_converted(pixels, channels, match):
    # Before: an RGB file for one channel was turned grey, a grey one for three repeated.
    with pytest.raises(ImageError, match=match):
        decode_image(_pil_bytes(pixels, "PNG"), channels=channels)


@pytest.mark.parametrize(("image", "shape", "message"), [
    (Image.new("RGB", (32, 32), (10, 20, 30)), (1, 8, 8),
     "the image is RGB 32×32 (H×W, 3 channels); model 'digits' takes 1×8×8 (C×H×W); "
     "images are never resized or converted"),
    (Image.new("RGB", (8, 8), (10, 20, 30)), (1, 8, 8),
     "the image is RGB 8×8 (H×W, 3 channels); model 'digits' takes 1×8×8 (C×H×W); "
     "images are never resized or converted"),
    (Image.new("L", (8, 6), 3), (3, 6, 8),
     "the image is greyscale 6×8 (H×W, 1 channel); model 'digits' takes 3×6×8 (C×H×W); "
     "images are never resized or converted"),
    (Image.new("RGBA", (8, 8), (1, 2, 3, 255)), (1, 8, 8),
     "the image is opaque RGBA 8×8 (H×W, 3 channels); model 'digits' takes 1×8×8 (C×H×W); "
     "images are never resized or converted"),
    (Image.new("P", (8, 8)), (1, 8, 8),
     "the image is RGB palette 8×8 (H×W, 3 channels); model 'digits' takes 1×8×8 (C×H×W); "
     "images are never resized or converted"),
    (Image.new("I;16", (8, 8)), (1, 4, 4),
     "the image is 16-bit greyscale 8×8 (H×W, 1 channel); model 'digits' takes 1×4×4 (C×H×W); "
     "images are never resized or converted"),
])
def test_decode_image_for_names_the_files_real_mode_and_size(image, shape, message):
    with pytest.raises(ImageError) as info:
        decode_image_for(_png(image), shape, model="digits")
    assert str(info.value) == message


def test_decode_image_for_accepts_the_exact_shape():
    pixels = _u8((6, 8, 3))
    out = decode_image_for(_pil_bytes(pixels, "PNG"), (3, 6, 8))
    np.testing.assert_array_equal(out, pixels.transpose(2, 0, 1) / np.float32(255))
    with pytest.raises(ImageError, match="; the model takes 1×6×8"):
        decode_image_for(_pil_bytes(pixels, "PNG"), (1, 6, 8))


def test_opaque_rgba_drops_alpha_exactly():
    pixels = _u8((3, 4, 4))
    pixels[..., 3] = 255
    out = decode_image(_pil_bytes(pixels, "PNG"))
    assert out.shape == (3, 3, 4)
    np.testing.assert_array_equal(out, pixels[..., :3].transpose(2, 0, 1) / np.float32(255))


@pytest.mark.parametrize(("alpha", "count"), [(0, 1), (254, 1), (128, 1)])
def test_rgba_with_any_transparency_is_refused(alpha, count):
    pixels = np.full((3, 4, 4), 255, np.uint8)
    pixels[1, 2, 3] = alpha
    with pytest.raises(ImageError) as info:
        decode_image(_pil_bytes(pixels, "PNG"))
    assert str(info.value) == (
        f"the image is RGBA 3×4 with {count} transparent or translucent pixel: alpha is refused unless "
        "every pixel is opaque (flatten the image onto a background first)")


def test_grey_with_alpha():
    pixels = np.stack([_u8((3, 3)), np.full((3, 3), 255, np.uint8)], axis=-1)
    out = decode_image(_png(Image.fromarray(pixels)))
    assert out.shape == (1, 3, 3)
    np.testing.assert_array_equal(out[0], pixels[..., 0] / np.float32(255))
    pixels[0, 0, 1] = 0
    with pytest.raises(ImageError, match=r"greyscale\+alpha 3×3 with 1 transparent"):
        decode_image(_png(Image.fromarray(pixels)))


def test_palette_expands_to_rgb_exactly():
    image = Image.new("P", (3, 2))
    palette = [0, 0, 0, 255, 0, 0, 10, 20, 30, 7, 7, 7]
    image.putpalette(palette + [0] * (768 - len(palette)))
    indices = np.array([[0, 1, 2], [3, 2, 1]], np.uint8)
    image.putdata(indices.ravel().tolist())
    out = decode_image(_png(image))
    colours = np.array(palette, np.uint8).reshape(-1, 3)
    assert out.shape == (3, 2, 3)
    np.testing.assert_array_equal(out, colours[indices].transpose(2, 0, 1) / np.float32(255))
    # All-grey colours are still a colour image: the file says palette RGB, not greyscale.
    with pytest.raises(ImageError, match="RGB palette 2×3 \\(H×W, 3 channels\\); expected 1 channel"):
        decode_image(_png(image), channels=1)


def test_palette_transparency_follows_the_alpha_rule():
    image = Image.new("P", (2, 2))
    image.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    image.putdata([1, 1, 1, 1])
    # Entry 0 is transparent but no pixel uses it: opaque, three channels.
    np.testing.assert_array_equal(decode_image(_png(image, transparency=0)), np.ones((3, 2, 2), np.float32))
    image.putpixel((0, 1), 0)
    with pytest.raises(ImageError, match="RGB palette 2×2 with 1 transparent or translucent pixel"):
        decode_image(_png(image, transparency=0))


def test_colour_key_transparency_follows_the_alpha_rule():
    grey = np.array([[1, 2], [3, 4]], np.uint8)
    np.testing.assert_array_equal(decode_image(_png(Image.fromarray(grey), transparency=9))[0],
                                  grey / np.float32(255))
    with pytest.raises(ImageError, match="1 transparent"):
        decode_image(_png(Image.fromarray(grey), transparency=3))
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (1, 2, 3)
    with pytest.raises(ImageError, match="RGB 2×2 with 1 transparent"):
        decode_image(_png(Image.fromarray(rgb), transparency=(1, 2, 3)))


def test_png_16_bit_grey_is_scaled_by_65535_exactly():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    decoded = decode_image(_png(image))
    assert decoded.shape == (1, 256, 256) and decoded.dtype == np.float32
    exact = values.astype(np.float64) / 65535
    # The float32 nearest each quotient: within half a float32 spacing of it, no further.
    error = np.abs(decoded[0].astype(np.float64) - exact)
    assert (error <= np.spacing(decoded[0]).astype(np.float64) / 2).all()
    assert decoded[0, 0, 0] == 0.0 and decoded[0, -1, -1] == 1.0
    # Big-endian samples written by hand read the same.
    handmade = _png_raw(3, 1, 16, 0, np.array([[0, 257, 65535]], dtype=">u2"))
    np.testing.assert_array_equal(decode_image(handmade)[0, 0], np.float32([0, 257, 65535]) / np.float32(65535))


@pytest.mark.parametrize(("colour_type", "samples", "named"), [
    (2, 3, "RGB"), (4, 2, r"greyscale\+alpha"), (6, 4, "RGBA"),
])
def test_16_bit_colour_or_alpha_pngs_are_refused_not_truncated(colour_type, samples, named):
    rows = np.full((1, 2 * samples), 4000, dtype=">u2")
    with pytest.raises(ImageError, match=f"16-bit {named} PNGs are refused"):
        decode_image(_png_raw(2, 1, 16, colour_type, rows))


def test_cmyk_jpeg_is_refused():
    out = io.BytesIO()
    Image.new("CMYK", (4, 4), (1, 2, 3, 4)).save(out, format="JPEG")
    with pytest.raises(ImageError, match="CMYK images are refused"):
        decode_image(out.getvalue())


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.mark.parametrize(("orientation", "turn"), [
    (3, lambda a: a[::-1, ::-1]),             # rotated 180°
    (6, lambda a: np.rot90(a, k=-1)),         # shown turned 90° clockwise
    (8, lambda a: np.rot90(a, k=1)),          # shown turned 90° anticlockwise
    (2, lambda a: a[:, ::-1]),                # mirrored
])
def test_exif_orientation_is_applied_first_jpeg(orientation, turn):
    pixels = np.kron(_u8((2, 3, 3), seed=orientation), np.ones((8, 8, 1), np.uint8))  # 16×24 blocks
    plain = decode_image(_pil_bytes(pixels, "JPEG", quality=100))
    tagged = _pil_bytes(pixels, "JPEG", quality=100, exif=_exif(orientation))
    out = decode_image(tagged)
    # The same JPEG stream decodes to the same pixels; the tag only turns them.
    np.testing.assert_array_equal(out, np.ascontiguousarray(turn(plain.transpose(1, 2, 0)).transpose(2, 0, 1)))
    if orientation in (6, 8):
        assert out.shape == (3, 24, 16)
        assert decode_image_for(tagged, (3, 24, 16)).shape == (3, 24, 16)
        with pytest.raises(ImageError, match="the image is RGB 24×16"):
            decode_image_for(tagged, (3, 16, 24))


def test_exif_orientation_is_applied_first_png():
    grey = _u8((2, 3))
    out = decode_image(_png(Image.fromarray(grey), exif=_exif(6)))
    np.testing.assert_array_equal(out[0], np.rot90(grey, k=-1) / np.float32(255))


def test_jpeg_round_trip_is_close():
    # A smooth image: JPEG's error on it is small and predictable.
    yy, xx = np.mgrid[0:32, 0:32]
    pixels = np.stack([yy * 8, xx * 8, (yy + xx) * 4], axis=-1).astype(np.uint8)
    out = decode_image(_pil_bytes(pixels, "JPEG", quality=95))
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    assert np.abs(out - pixels.transpose(2, 0, 1) / 255.0).mean() < 0.02
    grey = decode_image(_pil_bytes(pixels[..., 0], "JPEG", quality=95))
    assert grey.shape == (1, 32, 32)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"GIF89a" + b"\x00" * 20, "GIF"),
        (b"BM" + b"\x00" * 20, "BMP"),
        (b"", "empty"),
        (b"hello world", "unrecognised"),
        (b"\x93NUMPY\x01\x00", "npy"),
    ],
)
def test_other_formats_refused_with_accepted_list(data, named):
    with pytest.raises(ImageError, match="PNG or JPEG") as info:
        decode_image(data)
    assert named in str(info.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_truncated_images_refused(fmt, keep):
    data = _pil_bytes(_u8((64, 64, 3), seed=1), fmt)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode_image(data[: int(len(data) * keep)])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_header_only_refused(fmt):
    data = _pil_bytes(_u8((8, 8, 3)), fmt)
    with pytest.raises(ImageError):
        decode_image(data[:12])


def test_corrupt_png_crc_refused():
    data = bytearray(_pil_bytes(_u8((16, 16)), "PNG"))
    data[40] ^= 0xFF  # inside IDAT: the chunk's CRC no longer matches
    with pytest.raises(ImageError, match="corrupt"):
        decode_image(bytes(data))


def test_corrupt_jpeg_refused():
    data = bytearray(_pil_bytes(_u8((32, 32, 3)), "JPEG"))
    data[3:40] = b"\xff" * 37  # wreck the segment structure after SOI
    with pytest.raises(ImageError):
        decode_image(bytes(data))


def test_decompression_bomb_header_refused_before_decoding():
    # 100000 × 100000 claimed by a 100-byte file: refused from the header alone.
    bomb = _png_header_only(100_000, 100_000)
    assert len(bomb) < 200
    with pytest.raises(ImageError, match="pixels|decompression bomb"):
        decode_image(bomb)


def test_pil_bomb_warning_becomes_an_error():
    # 10000 × 10000 = 1e8 pixels: above PIL's warning limit, below its error limit; with our
    # own limit lifted, PIL's warning must still refuse the file.
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(_png_header_only(10_000, 10_000), max_pixels=10**12)


def test_bomb_between_our_limit_and_pils_is_refused_by_ours():
    width = height = 5000  # 25 M pixels: above MAX_PIXELS, below PIL's own limit
    assert width * height > MAX_PIXELS
    with pytest.raises(ImageError, match="more than the 16777216 accepted"):
        decode_image(_png_header_only(width, height))


def test_small_max_pixels():
    data = _pil_bytes(_u8((10, 10)), "PNG")
    assert decode_image(data, max_pixels=100).shape == (1, 10, 10)
    with pytest.raises(ImageError, match="10×10 = 100 pixels, more than the 99"):
        decode_image(data, max_pixels=99)


# --------------------------------------------------------------------------- encode_png


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.uint8,
        st.tuples(st.sampled_from([1, 3]), st.integers(1, 12), st.integers(1, 12)),
    )
)
def test_png_round_trip_is_exact(pixels):
    as_float = pixels.astype(np.float32) / np.float32(255)
    for source in (pixels, as_float):
        decoded = decode_image(encode_png(source), channels=pixels.shape[0])
        assert decoded.dtype == np.float32
        np.testing.assert_array_equal(decoded, as_float)
        np.testing.assert_array_equal(np.rint(decoded * 255).astype(np.uint8), pixels)


def test_encode_png_refuses_bad_arrays():
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        encode_png(np.full((1, 2, 2), 1.5))
    with pytest.raises(ImageError, match="NaN"):
        encode_png(np.full((1, 2, 2), np.nan))
    with pytest.raises(ImageError, match="shape"):
        encode_png(np.zeros((2, 4, 4)))
    assert decode_image(encode_png(np.ones((3, 3)))).shape == (1, 3, 3)


# --------------------------------------------------------------------------- npy


def test_npy_uint8_round_trip():
    pixels = _u8((3, 5, 4))
    out = decode_npy(_npy(pixels))
    assert out.dtype == np.float32 and out.shape == (3, 5, 4)
    np.testing.assert_array_equal(out, pixels / np.float32(255))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ">f4"])
def test_npy_float_round_trip(dtype):
    values = np.random.default_rng(2).random((2, 3, 4)).astype(dtype)
    out = decode_npy(_npy(values))
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, values.astype(np.float32))


def test_npy_two_dimensional_and_fortran_order():
    values = np.asfortranarray(np.random.default_rng(3).random((4, 6)))
    out = decode_npy(_npy(values))
    assert out.shape == (1, 4, 6)
    np.testing.assert_array_equal(out[0], values.astype(np.float32))


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (np.array([[0.5, np.nan]]), "1 NaN"),
        (np.array([[np.inf, 0.5, -np.inf]]), "2 infinite"),
        (np.array([[np.nan, np.inf]], dtype=np.float16), "1 NaN and 1 infinite"),
        (np.array([[0.0, 1.5]]), "min 0 and max 1.5"),
        (np.array([[-0.25, 0.5]], dtype=np.float32), "min -0.25 and max 0.5"),
        (np.array([[1e300, 0.5]]), "max 1e\\+300"),
    ],
)
def test_npy_bad_values_named(values, match):
    with pytest.raises(ImageError, match=match):
        decode_npy(_npy(values))


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (np.zeros((4, 4), dtype=bool), "bool"),
        (np.zeros((4, 4), dtype=np.int64), "int64"),
        (np.zeros((4, 4), dtype=np.uint16), "uint16"),
        (np.zeros((4, 4), dtype=np.int8), "int8"),
        (np.zeros((4, 4), dtype=np.complex64), "complex64"),
        (np.zeros((4, 4), dtype=np.longdouble), "refused"),
    ],
)
def test_npy_bad_dtypes_refused(values, match):
    with pytest.raises(ImageError, match=match):
        decode_npy(_npy(values))


@pytest.mark.parametrize("shape", [(4,), (1, 2, 3, 4), ()])
def test_npy_bad_dimensions(shape):
    with pytest.raises(ImageError, match="expected \\[H, W\\] or \\[C, H, W\\]"):
        decode_npy(_npy(np.zeros(shape, dtype=np.float32)))


def test_npy_pickle_refused():
    objects = np.empty((2, 2), dtype=object)
    objects[:] = 0.5
    with pytest.raises(ImageError, match="object"):
        decode_npy(_npy(objects))
    with pytest.raises(ImageError, match="not a .npy"):
        decode_npy(pickle.dumps(np.zeros((2, 2))))


@pytest.mark.parametrize("keep", [5, 9, 30, 100, -1])
def test_npy_truncated_refused(keep):
    data = _npy(np.zeros((3, 8, 8), dtype=np.float32))
    with pytest.raises(ImageError):
        decode_npy(data[:keep])


def test_npy_header_claiming_huge_shape_refused_without_allocating():
    data = _npy(np.zeros((3, 8, 8), dtype=np.float32))
    forged = data.replace(b"(3, 8, 8)", b"(3, 8, 9)")
    with pytest.raises(ImageError, match="header promises"):
        decode_npy(forged)
    bomb = data.replace(b"(3, 8, 8)", b"(3, 9999, 9999)")
    with pytest.raises(ImageError, match="pixels"):
        decode_npy(bomb)


def test_npy_corrupt_header_refused():
    data = _npy(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ImageError, match="header"):
        decode_npy(data.replace(b"'descr'", b"'dexcr'"))


def test_npz_given_as_npy_refused():
    out = io.BytesIO()
    np.savez(out, x=np.zeros((2, 2)))
    with pytest.raises(ImageError, match="zip"):
        decode_npy(out.getvalue())


# --------------------------------------------------------------------------- nested lists


def test_from_nested_round_trip():
    values = np.random.default_rng(4).random((3, 4, 5))
    out = from_nested(values.tolist())
    assert out.dtype == np.float32 and out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, values.astype(np.float32))
    assert from_nested([[0, 1], [1, 0]]).tolist() == [[[0.0, 1.0], [1.0, 0.0]]]


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ([[0.1, 0.2], [0.3]], r"ragged tensor: element \[1\] is a list of 1, expected .* 2"),
        ([[[0.1, 0.2], [0.3, 0.4]], [[0.1, 0.2]]], "ragged"),
        ([[0.1, 0.2], 0.3], "ragged"),
        ([[0.1, "0.2"]], "not a number"),
        ([[0.1, None]], "not a number"),
        ([[0.1, True]], "not a number"),
        ([[0.1, [0.2]]], "not a number"),
        ([[0.1, float("nan")]], "NaN"),
        ([[0.1, float("inf")]], "infinite"),
        ([[0, 255]], "max 255"),
        ([[10**400]], "not a usable number"),
        ([[]], "empty"),
        ([0.1, 0.2], "dimensions"),
        ([[[[0.1]]]], "dimensions"),
        (0.5, "nested lists"),
        ("abc", "nested lists"),
    ],
)
def test_from_nested_refusals(values, match):
    with pytest.raises(ImageError, match=match):
        from_nested(values)


def test_from_nested_max_pixels():
    with pytest.raises(ImageError, match="pixels"):
        from_nested([[0.0] * 5] * 5, max_pixels=24)


# --------------------------------------------------------------------------- check_shape


def test_check_shape_accepts_exact_and_two_dimensional_grey():
    image = np.zeros((1, 8, 8), dtype=np.float64)
    out = check_shape(image, (1, 8, 8))
    assert out.dtype == np.float32 and out.shape == (1, 8, 8)
    assert check_shape(np.zeros((8, 8), np.float32), [1, 8, 8]).shape == (1, 8, 8)


@pytest.mark.parametrize(
    ("shape", "input_shape", "match"),
    [
        ((3, 32, 32), (1, 8, 8), r"image has shape \(3, 32, 32\) but the model takes \(1, 8, 8\)"),
        ((3, 8, 8), (1, 8, 8), "3 channels, the model 1"),
        ((1, 8, 8), (3, 8, 8), "1 channels, the model 3"),
        ((8, 8), (3, 8, 8), "shape"),
        ((8, 9), (1, 8, 8), "shape"),
        ((1, 8, 8, 1), (1, 8, 8), "shape"),
    ],
)
def test_check_shape_refusals(shape, input_shape, match):
    with pytest.raises(ImageError, match=match):
        check_shape(np.zeros(shape, dtype=np.float32), input_shape)


def test_check_shape_refuses_undecoded_integers():
    with pytest.raises(ImageError, match="float"):
        check_shape(np.zeros((1, 2, 2), dtype=np.uint8), (1, 2, 2))


# --------------------------------------------------------------------------- load_inputs


def test_load_inputs_images_and_arrays(tmp_path):
    rgb = _u8((8, 8, 3))
    (tmp_path / "a.png").write_bytes(_pil_bytes(rgb, "PNG"))
    (tmp_path / "b.JPG").write_bytes(_pil_bytes(rgb, "JPEG"))
    (tmp_path / "c.jpeg").write_bytes(_pil_bytes(rgb, "JPEG", quality=90))
    single = np.random.default_rng(5).random((3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "d.npy", single)
    batch = _u8((4, 3, 8, 8))
    np.save(tmp_path / "e.npy", batch)
    items = load_inputs(
        [tmp_path / n for n in ("a.png", "b.JPG", "c.jpeg", "d.npy", "e.npy")], (3, 8, 8)
    )
    assert [i.name for i in items] == [
        "a.png", "b.JPG", "c.jpeg", "d.npy", "e.npy[0]", "e.npy[1]", "e.npy[2]", "e.npy[3]"
    ]
    for item in items:
        assert isinstance(item, InputItem) and item.label is None
        assert item.array.dtype == np.float32 and item.array.shape == (3, 8, 8)
        assert item.array.flags.c_contiguous
    np.testing.assert_array_equal(items[0].array, rgb.transpose(2, 0, 1) / np.float32(255))
    np.testing.assert_array_equal(items[3].array, single)
    np.testing.assert_array_equal(items[6].array, batch[2] / np.float32(255))
    with pytest.raises(AttributeError):
        items[0].name = "other"  # frozen


def test_load_inputs_grey_batches(tmp_path):
    np.save(tmp_path / "hw.npy", np.zeros((8, 8), np.float32))
    np.save(tmp_path / "nhw.npy", np.zeros((5, 8, 8), np.float32))
    np.save(tmp_path / "n1hw.npy", np.zeros((2, 1, 8, 8), np.float32))
    (tmp_path / "grey.png").write_bytes(_pil_bytes(_u8((8, 8)), "PNG"))
    items = load_inputs(
        [tmp_path / n for n in ("hw.npy", "nhw.npy", "n1hw.npy", "grey.png")], (1, 8, 8)
    )
    assert len(items) == 1 + 5 + 2 + 1
    assert all(i.array.shape == (1, 8, 8) for i in items)


def test_load_inputs_refuses_a_channel_mismatch_as_the_api_does(tmp_path):
    # The old rule turned an RGB file grey for a one-channel model, and a grey one RGB.
    (tmp_path / "rgb.png").write_bytes(_pil_bytes(_u8((8, 8, 3)), "PNG"))
    with pytest.raises(ImageError) as info:
        load_inputs([tmp_path / "rgb.png"], (1, 8, 8), model="digits")
    assert str(info.value) == (
        f"{tmp_path / 'rgb.png'}: the image is RGB 8×8 (H×W, 3 channels); model 'digits' takes 1×8×8 "
        "(C×H×W); images are never resized or converted")
    (tmp_path / "grey.jpg").write_bytes(_pil_bytes(_u8((8, 8)), "JPEG"))
    with pytest.raises(ImageError, match="grey.jpg: the image is greyscale 8×8 .*; the model takes 3×8×8"):
        load_inputs([tmp_path / "grey.jpg"], (3, 8, 8))


def test_load_inputs_npz_with_and_without_labels(tmp_path):
    x = _u8((3, 1, 4, 4))
    np.savez(tmp_path / "with.npz", x=x, y=np.array([2, 0, 9]))
    np.savez_compressed(tmp_path / "without.npz", x=x[0])
    items = load_inputs([tmp_path / "with.npz", tmp_path / "without.npz"], (1, 4, 4))
    assert [(i.name, i.label) for i in items] == [
        ("with.npz[0]", 2), ("with.npz[1]", 0), ("with.npz[2]", 9), ("without.npz[0]", None)
    ]
    np.testing.assert_array_equal(items[1].array, x[1] / np.float32(255))
    assert isinstance(items[0].label, int)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"y": np.array([1, 2])}, "named 'x'"),
        ({"x": np.zeros((3, 1, 4, 4)), "y": np.array([1, 2])}, "2 labels for 3 inputs"),
        ({"x": np.zeros((2, 1, 4, 4)), "y": np.array([0.5, 1.0])}, "integers"),
        ({"x": np.zeros((2, 1, 4, 4)), "y": np.array([1, -1])}, "≥ 0"),
        ({"x": np.zeros((2, 3, 4, 4))}, "shape"),
        ({"x": np.full((1, 4, 4), 2.0)}, "max 2"),
    ],
)
def test_load_inputs_bad_npz(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ImageError, match=match) as info:
        load_inputs([path], (1, 4, 4))
    assert "bad.npz" in str(info.value)


def test_load_inputs_refusals(tmp_path):
    (tmp_path / "a.gif").write_bytes(b"GIF89a")
    with pytest.raises(ImageError, match="unsupported file type .gif"):
        load_inputs([tmp_path / "a.gif"], (1, 4, 4))
    with pytest.raises(ImageError, match="cannot read"):
        load_inputs([tmp_path / "missing.png"], (1, 4, 4))
    (tmp_path / "big.png").write_bytes(_pil_bytes(_u8((8, 8)), "PNG"))
    with pytest.raises(ImageError, match=r"big.png: the image is greyscale 8×8 \(H×W, 1 channel\); the model"):
        load_inputs([tmp_path / "big.png"], (1, 4, 4))
    (tmp_path / "trunc.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ImageError, match="corrupt .npz"):
        load_inputs([tmp_path / "trunc.npz"], (1, 4, 4))
    (tmp_path / "fake.npz").write_bytes(_npy(np.zeros((1, 4, 4))))
    with pytest.raises(ImageError, match="not an .npz"):
        load_inputs([tmp_path / "fake.npz"], (1, 4, 4))
    np.save(tmp_path / "pickled.npy", np.array([[0.5]], dtype=object), allow_pickle=True)
    with pytest.raises(ImageError, match="object"):
        load_inputs([tmp_path / "pickled.npy"], (1, 1, 1))
    np.save(tmp_path / "four.npy", np.zeros((4, 4, 4), np.float32))
    with pytest.raises(ImageError, match="model takes"):
        load_inputs([tmp_path / "four.npy"], (3, 4, 4))
    (tmp_path / "rgb.png").write_bytes(_pil_bytes(_u8((4, 4, 3)), "PNG"))
    with pytest.raises(ImageError, match="RGB 4×4 \\(H×W, 3 channels\\); the model takes 4×4×4"):
        load_inputs([tmp_path / "rgb.png"], (4, 4, 4))
