"""mining.preprocess: every Pillow mode, EXIF orientation, draft decoding, crop geometry."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mining.preprocess import (
    ImageError,
    Preprocess,
    load_for_model,
    load_rgb,
    open_image,
    resize_center_crop,
)

IDENTITY = Preprocess(resize=32, crop=32, scale=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _png(im: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def _rgb_of(data: bytes) -> np.ndarray:
    """Mean RGB of the decoded model input (identity normalisation)."""
    return load_for_model(data, IDENTITY).reshape(3, -1).mean(axis=1)


@pytest.mark.parametrize(("mode", "value", "expected"), [
    ("RGB", (10, 20, 30), (10, 20, 30)),
    ("L", 77, (77, 77, 77)),
    ("1", 1, (255, 255, 255)),
    ("I;16", 65535, (255, 255, 255)),
    ("I;16", 32896, (128, 128, 128)),
    ("I", 30000, (117, 117, 117)),  # 16-bit range in a 32-bit image: /257
    ("I", 200, (200, 200, 200)),  # already 8-bit range
])
def test_modes_convert_to_expected_rgb(mode: str, value: object, expected: tuple[int, int, int]) -> None:
    im = Image.new(mode, (40, 40), value)
    data = _tiff(im) if mode.startswith("I") else _png(im)
    assert np.allclose(_rgb_of(data), expected, atol=1.0)


def _tiff(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "TIFF")
    return buf.getvalue()


def test_float_image_in_unit_range_is_scaled() -> None:
    im = Image.fromarray(np.full((40, 40), 0.5, np.float32), mode="F")
    assert np.allclose(_rgb_of(_tiff(im)), (128, 128, 128), atol=1.0)


def test_cmyk_converts() -> None:
    im = Image.new("CMYK", (40, 40), (0, 255, 255, 0))  # pure red in CMYK
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    r, g, b = _rgb_of(buf.getvalue())
    assert r > 200 and g < 40 and b < 40


def test_rgba_and_la_composite_on_white() -> None:
    transparent = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    assert np.allclose(_rgb_of(_png(transparent)), (255, 255, 255), atol=0.5)
    half = Image.new("RGBA", (40, 40), (0, 0, 0, 128))  # black at 50% over white
    assert np.allclose(_rgb_of(_png(half)), (127, 127, 127), atol=1.5)
    la = Image.new("LA", (40, 40), (0, 0))
    assert np.allclose(_rgb_of(_png(la)), (255, 255, 255), atol=0.5)


def test_palette_with_and_without_transparency() -> None:
    p = Image.new("P", (40, 40), 1)
    p.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    assert np.allclose(_rgb_of(_png(p)), (200, 10, 10), atol=0.5)
    assert np.allclose(_rgb_of(_png(p, transparency=1)), (255, 255, 255), atol=0.5)


def test_exif_orientation_is_applied() -> None:
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :100] = (255, 0, 0)  # stored: left half red, right half blue
    arr[:, 100:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, exif=exif)
    im = load_rgb(buf.getvalue())
    assert im.size == (100, 200)
    top, bottom = np.asarray(im)[:80].mean((0, 1)), np.asarray(im)[120:].mean((0, 1))
    assert top[0] > 200 and top[2] < 50  # red on top
    assert bottom[2] > 200 and bottom[0] < 50


def test_draft_decodes_jpeg_at_reduced_scale_but_not_below_target() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (2000, 1500), (90, 120, 30)).save(buf, "JPEG")
    im = open_image(buf.getvalue(), min_side=256)
    assert im.size == (500, 375)  # 1/4 DCT scale: the largest that keeps the short side >= 256
    im = open_image(buf.getvalue(), min_side=400)
    assert min(im.size) >= 400 and im.size[0] < 2000


def test_crop_box_resize_matches_full_resize_then_crop() -> None:
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)).resize((640, 512), Image.Resampling.BICUBIC)
    ours = np.asarray(resize_center_crop(base, 256, 224, "bilinear"), np.float32)
    full = base.resize((320, 256), Image.Resampling.BILINEAR)  # scale 1/2: the crop lands on whole pixels
    left, top = (320 - 224) // 2, (256 - 224) // 2
    ref = np.asarray(full.crop((left, top, left + 224, top + 224)), np.float32)
    assert ours.shape == (224, 224, 3)
    assert np.abs(ours - ref).mean() < 0.5


def test_load_for_model_shape_dtype_and_normalisation(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    Image.new("RGB", (800, 600), (127, 255, 0)).save(path, quality=95)
    pre = Preprocess()  # effnet: (x - 127) / 128
    x = load_for_model(path, pre)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32 and x.flags.c_contiguous
    assert np.allclose(x.reshape(3, -1).mean(1), (0.0, 128 / 128, -127 / 128), atol=0.02)
    clip = Preprocess(resize=224, crop=224, interpolation="bicubic", scale=1 / 255,
                      mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
    y = load_for_model(path, clip)
    assert y.shape == (3, 224, 224)
    assert y[1].mean() == pytest.approx((1.0 - 0.4578275) / 0.26130258, abs=0.05)


def test_unreadable_inputs_raise_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError):
        load_for_model(b"definitely not an image", IDENTITY)
    buf = io.BytesIO()
    Image.new("RGB", (600, 400), (1, 2, 3)).save(buf, "PNG")
    with pytest.raises(ImageError):
        load_for_model(buf.getvalue()[: len(buf.getvalue()) // 3], IDENTITY)
    with pytest.raises(ImageError):
        load_for_model(tmp_path / "missing.jpg", IDENTITY)


def test_preprocess_validates() -> None:
    with pytest.raises(ValueError, match="interpolation"):
        Preprocess(interpolation="fancy")
    with pytest.raises(ValueError, match="crop"):
        Preprocess(resize=100, crop=224)
    assert Preprocess.from_dict({"mean": 0.5, "std": [0.5, 0.5, 0.5]}).mean == (0.5, 0.5, 0.5)
