"""The one decoder: modes, orientation, and every kind of broken or hostile input."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from core.errors import InvalidImageError
from core.preprocessing import (MAX_PIXELS, apply_clahe, decode_image, ensure_rgb_uint8, load_image,
                                load_mask, resize)


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(h=40, w=60) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    return np.stack([x * 4 % 256, y * 6 % 256, (x + y) % 256], axis=2).astype(np.uint8)


def test_rgb_png_roundtrip_from_bytes_path_and_fileobj(tmp_path):
    arr = gradient()
    data = encode(Image.fromarray(arr))
    p = tmp_path / "a.png"
    p.write_bytes(data)
    for src in (data, p, str(p), io.BytesIO(data)):
        out = load_image(src)
        assert out.dtype == np.uint8 and out.shape == (40, 60, 3)
        np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("mode", ["L", "1", "P"])
def test_grey_binary_and_palette_become_rgb(mode):
    grey = (np.arange(40 * 60).reshape(40, 60) % 256).astype(np.uint8)
    im = Image.fromarray(grey).convert(mode)
    out = load_image(encode(im))
    assert out.shape == (40, 60, 3)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    if mode == "L":
        np.testing.assert_array_equal(out[..., 0], grey)
    if mode == "1":
        assert set(np.unique(out)) <= {0, 255}


def test_16bit_grey_png_and_tiff_scaled_by_257():
    arr16 = np.full((32, 32), 65535, np.uint16)
    arr16[:, :16] = 32896  # 128 * 257
    for fmt in ("PNG", "TIFF"):
        out = decode_image(encode(Image.fromarray(arr16), fmt))
        assert out.array.shape == (32, 32, 3)
        assert out.array[0, 0, 0] == 128 and out.array[0, 31, 0] == 255
        assert any("16-bit" in n for n in out.notes)


@pytest.mark.parametrize("bits", [10, 12, 14])
def test_10_to_14_bit_data_in_a_16bit_file_is_scaled_by_its_bit_depth(bits):
    """A 12-bit scan in a 16-bit PNG (maximum 4095) must not come out nearly black (4095 / 257 = 16)."""
    top = 2 ** bits - 1
    arr16 = np.zeros((32, 32), np.uint16)
    arr16[:, 8:16] = top // 2
    arr16[:, 16:] = top
    out = decode_image(encode(Image.fromarray(arr16), "PNG"))
    assert out.array[0, 31, 0] == 255 and out.array[0, 0, 0] == 0
    assert out.array[0, 10, 0] == round(top // 2 * 255 / top)
    assert any(f"{bits}-bit values" in n and f"/ {top}" in n for n in out.notes)


def test_8bit_values_in_a_16bit_file_and_wide_integers():
    arr16 = np.full((32, 32), 200, np.uint16)
    arr16[:, :4] = 7
    out = decode_image(encode(Image.fromarray(arr16), "PNG"))
    assert out.array[0, 31, 0] == 200 and out.array[0, 0, 0] == 7 and any("8-bit values" in n for n in out.notes)
    wide = np.full((32, 32), 1_000_000, np.int32)
    wide[:, :16] = 0
    out = decode_image(encode(Image.fromarray(wide), "TIFF"))
    assert out.array[0, 31, 0] == 255 and out.array[0, 0, 0] == 0 and any("32-bit" in n for n in out.notes)


def test_rgba_and_la_composited_on_white():
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:10, ..., 3] = 255  # top half opaque red, bottom transparent
    out = decode_image(encode(Image.fromarray(rgba, "RGBA")))
    assert tuple(out.array[0, 0]) == (255, 0, 0)
    assert tuple(out.array[15, 0]) == (255, 255, 255)
    la = Image.fromarray(np.stack([np.full((20, 20), 50, np.uint8), np.full((20, 20), 255, np.uint8)], 2), "LA")
    assert tuple(load_image(encode(la))[0, 0]) == (50, 50, 50)


def test_palette_with_transparency():
    im = Image.new("P", (20, 20), 0)
    im.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    im.paste(1, (0, 0, 10, 20))
    im.info["transparency"] = 0
    out = load_image(encode(im, transparency=0))
    assert tuple(out[0, 0]) == (200, 10, 10)
    assert tuple(out[0, 15]) == (255, 255, 255)


def test_cmyk_jpeg_converted():
    im = Image.new("CMYK", (24, 24), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(encode(im, "JPEG", quality=95))
    r, g, b = out.array[12, 12].astype(int)
    assert r > 200 and g < 60 and b < 60
    assert any("CMYK" in n for n in out.notes)


def test_exif_orientation_is_applied():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white, wide image
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = load_image(encode(im, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.shape == (40, 20, 3)  # now tall
    assert out[2, 10].mean() > 200 and out[-3, 10].mean() < 50  # left half became the top


def test_multiframe_takes_first_frame_and_says_so():
    frames = [Image.fromarray(np.full((20, 20, 3), v, np.uint8)) for v in (10, 200)]
    for fmt in ("GIF", "TIFF"):
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
        out = decode_image(buf.getvalue())
        assert out.array[5, 5, 0] < 50
        assert any("first frame" in n for n in out.notes)


def test_content_not_extension_decides(tmp_path):
    p = tmp_path / "really_a_jpeg.png"
    p.write_bytes(encode(Image.fromarray(gradient()), "JPEG"))
    out = decode_image(p)
    assert out.source_format == "JPEG" and out.array.shape == (40, 60, 3)


def test_constant_image_decodes_with_warning():
    out = decode_image(encode(Image.fromarray(np.full((30, 30), 7, np.uint8))))
    assert out.array.shape == (30, 30, 3)
    assert any("uniform" in n for n in out.notes)


def noise(h=200, w=200) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3)).astype(np.uint8)


def _png_with_huge_dims(w: int, h: int) -> bytes:
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")


# (name, bytes factory, expected phrase in the message); every one of these must be rejected.
REJECTED = [
    ("empty file", lambda: b"", "empty"),
    ("text renamed .png", lambda: b"patient notes: nothing to see here\n" * 20, "not an image format"),
    ("pdf renamed .png", lambda: b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n" * 10, "PDF"),
    ("svg", lambda: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "SVG"),
    ("truncated png", lambda: encode(Image.fromarray(noise()))[:20000], "damaged"),
    ("truncated jpeg", lambda: encode(Image.fromarray(noise()), "JPEG")[:5000], "damaged"),
    ("corrupt header", lambda: b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50, "damaged"),
    ("decompression bomb", lambda: _png_with_huge_dims(100_000, 100_000), "limit"),
    ("1x1 image", lambda: encode(Image.new("RGB", (1, 1))), "at least"),
    ("very thin image", lambda: encode(Image.new("RGB", (2000, 3))), "at least"),
]


@pytest.mark.parametrize("name,factory,phrase", REJECTED, ids=[r[0] for r in REJECTED])
def test_unusable_inputs_raise_invalid_image_error(name, factory, phrase):
    with pytest.raises(InvalidImageError) as info:
        load_image(factory())
    assert isinstance(info.value, ValueError)
    assert phrase.lower() in str(info.value).lower()


def test_bomb_limit_is_below_pillow_default():
    assert MAX_PIXELS < Image.MAX_IMAGE_PIXELS


def test_file_over_size_cap_rejected(tmp_path):
    p = tmp_path / "big.png"
    p.write_bytes(encode(Image.fromarray(gradient())))
    with pytest.raises(InvalidImageError, match="limit"):
        load_image(p, max_bytes=100)
    with pytest.raises(InvalidImageError, match="limit"):
        load_image(p.read_bytes(), max_bytes=100)


def test_missing_file_message(tmp_path):
    with pytest.raises(InvalidImageError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_mask_union_and_resize(tmp_path):
    a = np.zeros((10, 10), np.uint8)
    a[:5] = 255
    b = np.zeros((10, 10), np.uint8)
    b[:, :2] = 1
    Image.fromarray(a).save(tmp_path / "m.png")
    Image.fromarray(b * 255).convert("1").save(tmp_path / "m1.png")
    m = load_mask([tmp_path / "m.png", tmp_path / "m1.png"])
    assert m.dtype == bool and m.sum() == 50 + 10
    assert load_mask([tmp_path / "m.png"], (20, 20)).sum() == 200
    assert load_mask([], (4, 4)).sum() == 0


def test_resize_clahe_and_array_coercion():
    img = gradient(40, 60)
    assert resize(img, (20, 30)).shape == (20, 30, 3)
    assert resize(img, (80, 120)).shape == (80, 120, 3)
    assert apply_clahe(img).shape == img.shape
    assert ensure_rgb_uint8(np.zeros((5, 5))).shape == (5, 5, 3)
    assert ensure_rgb_uint8(np.full((5, 5, 4), 300.0))[0, 0, 0] == 255
    with pytest.raises(InvalidImageError):
        ensure_rgb_uint8(np.zeros((5, 5, 7)))
