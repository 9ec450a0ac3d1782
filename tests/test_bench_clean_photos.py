"""bench/debian_clean_photos.py cuts training photos out of resource bundles by their own headers.

Why test a bench helper: a carver that silently drops or mangles pictures changes what the
watermark CNN trains on, and the README's recipe depends on it reproducing the same photos.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TOOL = Path(__file__).resolve().parents[1] / "bench" / "debian_clean_photos.py"


@pytest.fixture(scope="module")
def clean_photos_tool():
    spec = importlib.util.spec_from_file_location("debian_clean_photos", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def encoded(fmt: str, size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, quality=90)
    return buf.getvalue()


def test_embedded_images_finds_webp_and_jpeg_at_their_offsets(clean_photos_tool):
    webp, jpeg = encoded("WEBP", (300, 200), 1), encoded("JPEG", (120, 90), 2)
    assert len(webp) > 40_000
    icon = encoded("WEBP", (16, 16), 3)  # under the size floor: an icon, not a photo
    not_webp = b"RIFF" + (100).to_bytes(4, "little") + b"WAVEfmt " + bytes(92)
    blob = b"\x00" * 10 + webp + b"junk" + not_webp + jpeg + icon + b"\xff\xd8\xff\xe0broken" + b"\x01" * 50
    found = clean_photos_tool.embedded_images(blob)
    assert [(tag, start, img.size) for tag, start, img in found] == [
        ("", 10, (300, 200)), ("j", 10 + len(webp) + 4 + len(not_webp), (120, 90))]


def test_embedded_images_of_nothing_is_empty(clean_photos_tool):
    assert clean_photos_tool.embedded_images(b"RIFF\xff\xff\xff\xffWEBP" + b"\x00" * 64) == []
