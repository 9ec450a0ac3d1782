"""Decode an image and turn it into one model input, fast and correctly.

Decoding full-resolution photos dominates embedding time, so JPEGs are decoded with
Pillow's draft mode (DCT scaling: the decoder itself produces a 1/2, 1/4 or 1/8 size image
that is still at least the size the model needs), and the resize computes only the centre
crop (``resize(..., box=...)``), never the whole resized image.

Correctness rules, applied before any resizing:
- EXIF orientation is honoured (``ImageOps.exif_transpose``): phones store rotated pixels.
- Transparency (RGBA, LA, PA, P with a transparency key) is composited on WHITE, the
  colour a viewer shows behind a transparent photo/logo on a light page; a black
  background would turn transparent areas into dark blobs the model would "see".
- CMYK goes through Pillow's CMYK->RGB (Adobe-inverted JPEGs are handled by the decoder).
- 16-bit greyscale (I;16*) and 32-bit (I) are scaled to 8 bit by their full range
  (65535 -> 255), float (F) images in [0, 1] by 255; 1-bit and L become grey RGB.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
BACKGROUND = (255, 255, 255)


class ImageError(ValueError):
    """The file is not an image this pipeline can read (a per-item failure, never a crash)."""


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its input: resize short side, centre crop, x*scale then (x-mean)/std."""

    resize: int = 256
    crop: int = 224
    interpolation: str = "bilinear"
    scale: float = 1.0
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; one of {sorted(_RESAMPLE)}")
        if self.layout != "NCHW":
            raise ValueError(f"only NCHW layout is supported, not {self.layout!r}")
        if self.crop < 1 or self.resize < self.crop:
            raise ValueError(f"need 1 <= crop <= resize, got crop={self.crop} resize={self.resize}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        d = dict(data)
        for key in ("mean", "std"):
            if key in d:
                v = d[key]
                d[key] = tuple(float(x) for x in (v if isinstance(v, list | tuple) else [v] * 3))
        return cls(**d)


def _spec_preprocess(spec: Any) -> Preprocess:
    return spec if isinstance(spec, Preprocess) else spec.preprocess


def open_image(src: str | Path | bytes, min_side: int | None = None) -> Image.Image:
    """Open lazily; for JPEG, ask the decoder for the smallest DCT scale whose short side >= min_side."""
    try:
        im = Image.open(io.BytesIO(src) if isinstance(src, bytes | bytearray) else src)
    except (OSError, Image.DecompressionBombError, ValueError) as exc:
        raise ImageError(f"not a readable image: {exc}") from exc
    if min_side and im.format == "JPEG":
        # draft keeps both sides >= the request, so the short side stays >= min_side;
        # EXIF rotation does not matter because the request is square.
        im.draft("RGB" if im.mode in ("RGB", "YCbCr") else im.mode, (min_side, min_side))
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, with the rules in this module's docstring."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        if "transparency" in im.info:
            return _on_white(im.convert("RGBA"))
        return im.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return _on_white(im.convert("RGBA"))
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im)
        if mode == "F":
            arr = arr.astype(np.float64)
            peak = float(np.nanmax(arr)) if arr.size else 0.0
            arr = arr * 255.0 if peak <= 1.0 else arr
        elif mode.startswith("I;16") or (arr.size and int(arr.max()) > 255):
            arr = arr.astype(np.float64) / 257.0
            if mode == "I" and arr.size and arr.max() > 255:  # beyond 16 bit: scale by its own range
                arr = arr * (255.0 / arr.max())
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return im.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def load_rgb(src: str | Path | bytes, min_side: int | None = None) -> Image.Image:
    """Decoded, orientation-corrected RGB image (draft-decoded to >= min_side when JPEG)."""
    im = open_image(src, min_side)
    try:
        im = ImageOps.exif_transpose(im)
        return to_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot decode image: {exc}") from exc


def resize_center_crop(im: Image.Image, resize: int, crop: int, interpolation: str = "bilinear") -> Image.Image:
    """Short side -> ``resize``, centre ``crop`` x ``crop``, computing only the cropped pixels."""
    w, h = im.size
    if w < 1 or h < 1:
        raise ImageError("empty image")
    r = resize / min(w, h)
    # the crop window in resized coordinates, mapped back to source coordinates
    left = (w * r - crop) / 2.0 / r
    top = (h * r - crop) / 2.0 / r
    side = crop / r
    return im.resize((crop, crop), _RESAMPLE[interpolation], box=(left, top, left + side, top + side))


def normalise(im: Image.Image, pre: Preprocess) -> np.ndarray:
    """uint8 HWC RGB -> float32 CHW, x*scale then (x-mean)/std, in numpy."""
    arr = np.asarray(im, dtype=np.float32)
    if pre.scale != 1.0:
        arr *= np.float32(pre.scale)
    arr -= np.asarray(pre.mean, np.float32)
    arr *= np.asarray([1.0 / s for s in pre.std], np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_for_model(src: str | Path | bytes, spec: Any) -> np.ndarray:
    """One image as the model's input tensor (3, crop, crop) float32; ImageError if unreadable.

    ``spec`` is a ModelSpec (its ``preprocess``) or a Preprocess.
    """
    pre = _spec_preprocess(spec)
    im = load_rgb(src, min_side=pre.resize)
    try:
        out = resize_center_crop(im, pre.resize, pre.crop, pre.interpolation)
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot resize image: {exc}") from exc
    arr = normalise(out, pre)
    if not math.isfinite(float(arr.sum())):
        raise ImageError("image produced non-finite values")
    return arr
