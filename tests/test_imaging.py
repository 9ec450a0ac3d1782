"""Safe sniffing/verification: format from magic bytes, bombs refused before decoding."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from mining.imaging import ImageRejected, open_image_safely, sniff_format, verify_image
from mining.settings import Settings


def jpeg_bytes(size: tuple[int, int] = (200, 150), color: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, color)
    for x in range(0, size[0], 7):  # some texture so the entropy-coded stream is not trivial
        img.putpixel((x, x % size[1]), (255, 255, 255))
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid 1-bit single-colour PNG: a few KB on disk, ``width*height`` pixels when decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(1)
    block = row * 1000
    idat = b"".join(comp.compress(block) for _ in range(height // 1000))
    idat += comp.compress(row * (height % 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return png_bomb()


def test_sniff_by_magic_bytes_not_by_name() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "WEBP")
    assert sniff_format(jpeg_bytes()) == "JPEG"
    assert sniff_format(buf.getvalue()) == "WEBP"
    assert sniff_format(b"GIF89a....") == "GIF"
    assert sniff_format(b"<html><body>404</body></html>") is None
    assert sniff_format(b"") is None


def test_verify_reports_format_and_real_size(settings: Settings) -> None:
    info = verify_image(jpeg_bytes((321, 123)), settings)
    assert (info.format, info.width, info.height, info.animated) == ("JPEG", 321, 123, False)
    assert info.extension == "jpg"


def test_truncated_jpeg_is_rejected(settings: Settings) -> None:
    data = jpeg_bytes((800, 600))
    with pytest.raises(ImageRejected) as err:
        verify_image(data[: len(data) // 2], settings)
    assert err.value.reason == "truncated"


def test_html_is_not_an_image(settings: Settings) -> None:
    with pytest.raises(ImageRejected) as err:
        verify_image(b"<!doctype html><html>nope</html>", settings)
    assert err.value.reason == "not_an_image"


def test_png_bomb_refused_before_decode(settings: Settings, bomb: bytes) -> None:
    assert len(bomb) < 1_000_000  # small on the wire...
    with pytest.raises(ImageRejected) as err:  # ...and refused from its header alone
        verify_image(bomb, settings)
    assert err.value.reason == "decompression_bomb"
    with pytest.raises(ImageRejected), open_image_safely(bomb, settings):
        pass


def test_pixel_limit_is_the_setting(settings: Settings) -> None:
    data = jpeg_bytes((300, 300))
    with pytest.raises(ImageRejected) as err:
        verify_image(data, settings.replace(max_image_pixels=300 * 300 - 1))
    assert err.value.reason == "decompression_bomb"
    assert verify_image(data, settings.replace(max_image_pixels=300 * 300)).width == 300


def test_open_image_safely_yields_decoded_image(settings: Settings) -> None:
    with open_image_safely(jpeg_bytes((64, 48)), settings) as img:
        assert img.format == "JPEG"
        assert img.size == (64, 48)
        assert img.getpixel((1, 1)) is not None


def test_corrupt_png_is_rejected(settings: Settings) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (300, 300), (1, 2, 3)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[60] ^= 0xFF  # flip a byte inside IDAT: CRC mismatch
    with pytest.raises(ImageRejected) as err:
        verify_image(bytes(data), settings)
    assert err.value.reason in ("bad_image", "truncated")
