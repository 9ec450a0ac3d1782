"""Safe image sniffing and verification, shared by the downloader, the gallery and the models.

Content-Type headers lie (HTML error pages served as image/jpeg) and images can be hostile
(a 30000x30000 single-colour PNG is a few KB on the wire and 2.7 GB in memory), so the
format is taken from magic bytes, the pixel count is checked before any decode, and the
image is fully decoded once so truncated files fail here rather than in the embedder.
Failures are :class:`ImageRejected` with a short ``reason`` that becomes a status.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image

from mining.settings import Settings

EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}


class ImageRejected(ValueError):
    """The bytes are not an image we accept; ``reason`` is the status suffix (e.g. ``truncated``)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    format: str  # JPEG, PNG, WEBP, GIF
    width: int
    height: int
    animated: bool

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]


def sniff_format(head: bytes) -> str | None:
    """The image format named by the first bytes, or None (never trusts Content-Type)."""
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _open_checked(data: bytes, settings: Settings) -> tuple[Image.Image, str]:
    """Open (header only) after sniffing, refusing bombs before any pixel is decoded."""
    fmt = sniff_format(data[:16])
    if fmt is None:
        raise ImageRejected("not_an_image", repr(data[:16]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("decompression_bomb", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        # A header cut short reads as "cannot identify"; say truncated when the magic was right.
        raise ImageRejected("truncated" if len(data) < 1024 else "bad_image", str(exc)) from None
    width, height = img.size
    if width <= 0 or height <= 0:
        img.close()
        raise ImageRejected("bad_image", f"size {width}x{height}")
    if width * height > settings.max_image_pixels:
        img.close()
        raise ImageRejected("decompression_bomb", f"{width}x{height} > {settings.max_image_pixels} pixels")
    return img, fmt


def _decode(img: Image.Image) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("decompression_bomb", str(exc)) from None
    except OSError as exc:
        text = str(exc).lower()
        reason = "truncated" if "truncated" in text or "broken data stream" in text else "bad_image"
        raise ImageRejected(reason, str(exc)) from None
    except (SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected("bad_image", str(exc)) from None


def verify_image(data: bytes, settings: Settings) -> ImageInfo:
    """Sniff, bomb-check, verify and decode ``data``; cheap for JPEG (decoded at 1/8 scale).

    Draft mode still walks the whole entropy-coded stream, so truncation is still caught.
    """
    img, fmt = _open_checked(data, settings)
    width, height = img.size
    animated = bool(getattr(img, "is_animated", False))
    if fmt == "PNG":  # verify() checks chunk CRCs but leaves the image unusable: reopen to decode
        with img:
            try:
                img.verify()
            except Exception as exc:
                reason = "truncated" if "truncat" in str(exc).lower() else "bad_image"
                raise ImageRejected(reason, str(exc)) from None
        img, _ = _open_checked(data, settings)
    with img:
        if fmt == "JPEG":
            img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
        _decode(img)
    return ImageInfo(fmt, width, height, animated)


@contextmanager
def open_image_safely(data: bytes, settings: Settings) -> Iterator[Image.Image]:
    """A fully decoded PIL image from untrusted bytes (``.format`` set), or ImageRejected."""
    img, _ = _open_checked(data, settings)
    try:
        _decode(img)
        yield img
    finally:
        img.close()
