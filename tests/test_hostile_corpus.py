"""The hostile-upload corpus of issue 5: every file a user can upload either decodes or is rejected cleanly.

CORPUS below records, for each case, whether it is DECODED or REJECTED and the phrase of the message;
the test fails if any case changes sides or anything other than InvalidImageError escapes.
"""
from __future__ import annotations

import io
import tomllib

import numpy as np
import pytest
from PIL import Image

from core.errors import InvalidImageError
from core.preprocessing import MAX_BYTES, decode_image
from tests.conftest import ROOT
from tests.test_preprocessing import REJECTED, encode, gradient, noise


def _frames(fmt):
    buf = io.BytesIO()
    frames = [Image.fromarray(np.full((20, 20, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _exif_jpeg():
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(gradient(20, 40)), "JPEG", exif=exif.tobytes())


def _palette_transparent():
    im = Image.new("P", (20, 20), 0)
    im.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    return encode(im, transparency=0)


DECODED = {
    "16-bit greyscale PNG": lambda: encode(Image.fromarray(np.full((32, 32), 40000, np.uint16))),
    "16-bit greyscale TIFF": lambda: encode(Image.fromarray(np.full((32, 32), 40000, np.uint16)), "TIFF"),
    "1-bit PNG": lambda: encode(Image.fromarray(gradient()[..., 0] > 100)),
    "palette with transparency": _palette_transparent,
    "RGBA PNG": lambda: encode(Image.fromarray(np.zeros((20, 20, 4), np.uint8), "RGBA")),
    "CMYK JPEG": lambda: encode(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG"),
    "multi-frame GIF (first frame)": lambda: _frames("GIF"),
    "multi-frame TIFF (first frame)": lambda: _frames("TIFF"),
    "EXIF-rotated JPEG": _exif_jpeg,
    "JPEG named .png (by content)": lambda: encode(Image.fromarray(gradient()), "JPEG"),
    "constant image (NaN-prone after normalisation)": lambda: encode(Image.fromarray(np.full((30, 30), 7, np.uint8))),
    "BMP": lambda: encode(Image.fromarray(noise(40, 40)), "BMP"),
}


def test_corpus_table(capsys):
    table = []
    for name, factory in DECODED.items():
        d = decode_image(factory())
        assert d.array.dtype == np.uint8 and d.array.ndim == 3 and d.array.shape[2] == 3
        assert np.isfinite(d.array.astype(np.float32) / max(float(d.array.std()), 1e-7)).all()
        table.append((name, "decoded", "; ".join(d.notes) or "-"))
    for name, factory, phrase in REJECTED:
        with pytest.raises(InvalidImageError) as info:
            decode_image(factory())
        table.append((name, "rejected", str(info.value)))
    with pytest.raises(InvalidImageError) as info:
        decode_image(b"\x89PNG" + b"0" * (MAX_BYTES + 1))
    table.append(("file over the 50 MB upload cap", "rejected", str(info.value)))
    print("\n".join(f"| {a} | {b} | {c} |" for a, b, c in table))
    assert sum(r[1] == "decoded" for r in table) == len(DECODED)
    assert sum(r[1] == "rejected" for r in table) == len(REJECTED) + 1


def test_dashboard_never_renders_user_html():
    for f in (ROOT / "dashboard").rglob("*.py"):
        assert "unsafe_allow_html" not in f.read_text(), f"{f} uses unsafe_allow_html"


def test_streamlit_config_safe_defaults():
    cfg = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["enableXsrfProtection"] is True
    assert cfg["server"]["maxUploadSize"] * 2**20 == MAX_BYTES
    assert cfg["browser"]["gatherUsageStats"] is False


def test_uploads_are_not_written_to_disk():
    src = (ROOT / "dashboard" / "components.py").read_text()
    assert "up.getvalue()" in src  # uploads stay in memory
    for f in (ROOT / "dashboard").rglob("*.py"):
        text = f.read_text()
        assert "write_bytes(" not in text and "open(" not in text.replace("Image.open(", ""), f
