"""Synthetic watermarks over clean photos, and clean scene text: the training data of the watermark detector.

No labelled watermark set can be downloaded here, but the user's own clean photos are
exactly their kind of image, so positives are made by stamping them the way creators and
stock sites do (text, signatures, logos, tiled patterns; faint and strong), then every
example (clean ones too) is resized and recompressed the way Reddit serves images, so a
detector learns the mark rather than the JPEG artefacts. Everything is drawn from the
given ``numpy.random.Generator`` and fonts from pinned wheels: same rng state, same image, on any machine.
"""

from __future__ import annotations

import importlib.util
import io
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

KINDS = ("corner", "centre", "tiled", "logo")
STRENGTHS = ("faint", "strong")
FAINT_OPACITY = (0.15, 0.35)
STRONG_OPACITY = (0.5, 0.95)
# Creators pick an ink that stands out from the photo under it. A mark drawn in nearly the photo's
# own tone (dark grey over dark rocks) cannot be seen even at full opacity, so it is no watermark:
# labelled positive it only teaches a detector to fire on texture. Below this mean per-pixel
# luminance difference (0-255, before opacity) the ink is recoloured.
MIN_CONTRAST = 48.0
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)

# The fonts come from pinned PyPI wheels (SIL OFL / Apache), never from the machine: the examples
# every detector trains and is measured on must be the same everywhere. System fonts made them
# depend on whatever else was installed (a browser pulling in fonts-liberation changed the demo's
# decisions and every held-out figure). Sans, serif, geometric, rounded, hand-drawn, pixel.
FONT_PACKAGES = ("font_source_sans_pro", "font_source_serif_pro", "font_caladea", "font_hanken_grotesk",
                 "font_fredoka_one", "font_amatic_sc", "font_intuitive")

_SYLLABLES = ("ka", "ri", "mo", "lan", "ter", "vi", "so", "ne", "dar", "el", "an", "to", "mar", "lu", "ste",
              "ph", "ben", "ja", "min", "ro", "sa", "li", "ck", "ol", "ver", "ha", "nu", "gre", "the", "wil")
_WORDS = ("PHOTOGRAPHY", "Photography", "photo", "studio", "images", "PREVIEW", "SAMPLE", "stock", "Pictures",
          "visuals", "captures", "lens", "shots", "media", "Art", "DESIGN", "WATERMARK", "copyright")
_TLDS = (".com", ".net", ".photo", ".art", ".co", ".io", ".de", ".fr")


@lru_cache(maxsize=1)
def font_families() -> tuple[tuple[str, ...], ...]:
    """The synthesiser's fonts by family (one per package), one file per face, in a fixed order.

    Raises when one of :data:`FONT_PACKAGES` is not installed: with part of the set the
    examples would silently differ from everyone else's.
    """
    families: list[tuple[str, ...]] = []
    missing = []
    for package in FONT_PACKAGES:
        spec = importlib.util.find_spec(package)  # locates the wheel without importing it
        if spec is None or not spec.submodule_search_locations:
            missing.append(package)
            continue
        faces: dict[str, Path] = {}
        for path in sorted(Path(next(iter(spec.submodule_search_locations)), "files").iterdir()):
            if path.suffix.lower() in (".ttf", ".otf"):  # a face shipped as both: keep the TrueType file
                if path.stem not in faces or path.suffix.lower() == ".ttf":
                    faces[path.stem] = path
        if not faces:  # a broken install: no faces is as good as missing
            missing.append(package)
            continue
        families.append(tuple(str(faces[name]) for name in sorted(faces)))
    if missing:
        raise RuntimeError(f"the watermark synthesiser's font packages are missing: {', '.join(missing)} "
                           "(reinstall mining: pip install -c constraints.txt -e .)")
    return tuple(families)


@lru_cache(maxsize=512)
def _font(path: str | None, size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The face at ``path`` (None: Pillow's built-in); never fails (falls back to the built-in)."""
    if path is not None:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            pass
    try:
        return ImageFont.load_default(size=size)  # FreeType build: a scalable bundled font
    except (TypeError, OSError):  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def _pick_font(rng: np.random.Generator, size: int) -> tuple[Any, str]:
    """A family (or Pillow's built-in) at random, then one of its faces: styles weigh alike."""
    families = font_families()
    index = int(rng.integers(1 + len(families)))
    if index == 0:
        return _font(None, max(6, int(size))), "builtin"
    family = families[index - 1]
    path = family[int(rng.integers(len(family)))]
    return _font(path, max(6, int(size))), Path(path).stem


def _name(rng: np.random.Generator) -> str:
    parts = [str(rng.choice(_SYLLABLES)) for _ in range(int(rng.integers(2, 4)))]
    return "".join(parts).capitalize()


def random_text(rng: np.random.Generator) -> str:
    """Watermark-like text: credits, handles, sites, stock words, dates."""
    first, last = _name(rng), _name(rng)
    year = int(rng.integers(2005, 2026))
    templates = (
        f"© {first} {last}",
        f"© {year} {first} {last}",
        f"@{first.lower()}{last.lower()}",
        f"@{first.lower()}_{str(rng.choice(_WORDS)).lower()}",
        f"www.{first.lower()}{last.lower()}{rng.choice(_TLDS)}",
        f"{first.lower()}{rng.choice(_TLDS)}",
        f"{first} {last} {rng.choice(_WORDS)}",
        f"{first.upper()} {str(rng.choice(_WORDS)).upper()}",
        str(rng.choice(_WORDS)),
        f"{first} {last}",
        f"photo by {first} {last}",
        f"{first}{rng.choice(_WORDS)}{rng.choice(_TLDS)}",
    )
    text = str(templates[int(rng.integers(len(templates)))])
    if rng.random() < 0.15:
        text = text.upper()
    return text


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r = rng.random()
    if r < 0.45:
        v = int(rng.integers(225, 256))
        return (v, v, v)
    if r < 0.7:
        v = int(rng.integers(0, 40))
        return (v, v, v)
    if r < 0.8:
        v = int(rng.integers(90, 180))
        return (v, v, v)
    return tuple(int(c) for c in rng.integers(0, 256, 3))  # type: ignore[return-value]


def _text_layer(text: str, font: Any, colour: tuple[int, int, int], rng: np.random.Generator,
                outline: bool) -> Image.Image:
    """Text on its own transparent layer, cropped to the ink (optionally outlined/shadowed)."""
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
    pad = 4 + max(2, (bottom - top) // 8)
    w, h = max(1, right - left + 2 * pad), max(1, bottom - top + 2 * pad)
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    origin = (pad - left, pad - top)
    if outline:
        dark = sum(colour) > 380
        stroke = (0, 0, 0, 255) if dark else (255, 255, 255, 255)
        width = max(1, (bottom - top) // 18)
        if rng.random() < 0.5:  # drop shadow
            draw.text((origin[0] + width, origin[1] + width), text, font=font, fill=stroke)
        else:
            draw.text(origin, text, font=font, fill=(*colour, 255), stroke_width=width, stroke_fill=stroke)
            return layer
    draw.text(origin, text, font=font, fill=(*colour, 255))
    return layer


def _signature_layer(height: int, colour: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    """A handwritten-looking scribble: a smooth pen path with loops, like a signature."""
    height = max(12, height)
    width = int(height * rng.uniform(2.0, 4.5))
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    n = int(rng.integers(40, 90))
    t = np.linspace(0, 1, n)
    loops = rng.uniform(3, 9)
    x = 0.05 * width + 0.9 * width * t + 0.06 * width * np.sin(2 * math.pi * loops * t + rng.uniform(0, 6))
    y = (0.5 * height + 0.32 * height * np.sin(2 * math.pi * loops * t * rng.uniform(0.8, 1.3))
         * (0.5 + 0.5 * np.cos(2 * math.pi * rng.uniform(0.3, 1.5) * t)))
    y += rng.normal(0, 0.02 * height, n).cumsum() * 0.3
    pen = max(1, int(height * rng.uniform(0.04, 0.09)))
    points = [(float(a), float(b)) for a, b in zip(x, np.clip(y, 1, height - 2), strict=True)]
    draw.line(points, fill=(*colour, 255), width=pen, joint="curve")
    if rng.random() < 0.6:  # underline flourish
        yy = height * rng.uniform(0.75, 0.92)
        draw.line([(0.1 * width, yy), (0.95 * width, yy - rng.uniform(0, 0.15) * height)],
                  fill=(*colour, 255), width=pen)
    return layer


def _logo_layer(size: int, colour: tuple[int, int, int], rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A stamp/logo: circle, ring, rounded box or banner with short text."""
    size = max(16, size)
    shape = str(rng.choice(("circle", "ring", "box", "banner")))
    text = _name(rng).upper()[: int(rng.integers(2, 8))] if rng.random() < 0.6 else random_text(rng)
    if shape == "banner":
        font, _ = _pick_font(rng, size * 0.45)
        text_img = _text_layer(text, font, colour, rng, outline=False)
        w, h = text_img.width + size // 2, max(text_img.height + size // 5, size // 2)
        layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        back = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
        draw.rectangle((0, 0, w - 1, h - 1), fill=(*back, int(rng.integers(90, 200))))
        layer.alpha_composite(text_img, ((w - text_img.width) // 2, (h - text_img.height) // 2))
        return layer, shape
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    line = max(2, size // 18)
    if shape == "circle":
        draw.ellipse((0, 0, size - 1, size - 1), fill=(*colour, 255))
        ink = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
    elif shape == "ring":
        draw.ellipse((0, 0, size - 1, size - 1), outline=(*colour, 255), width=line)
        inner = size // 7
        draw.ellipse((inner, inner, size - 1 - inner, size - 1 - inner), outline=(*colour, 255), width=max(1, line // 2))
        ink = colour
    else:
        draw.rounded_rectangle((0, 0, size - 1, size - 1), radius=size // 6, outline=(*colour, 255), width=line)
        ink = colour
    font, _ = _pick_font(rng, size * (0.5 if len(text) <= 3 else 0.9 / max(1, len(text)) * 1.6))
    text_img = _text_layer(text, font, ink, rng, outline=False)
    if text_img.width > size * 0.85:
        scale = size * 0.85 / text_img.width
        text_img = text_img.resize((max(1, int(text_img.width * scale)), max(1, int(text_img.height * scale))))
    layer.alpha_composite(text_img, ((size - text_img.width) // 2, (size - text_img.height) // 2))
    return layer, shape


def _rotate(layer: Image.Image, degrees: float) -> Image.Image:
    return layer if abs(degrees) < 0.5 else layer.rotate(degrees, resample=Image.BICUBIC, expand=True)


def _corner_xy(rng: np.random.Generator, W: int, H: int, w: int, h: int) -> tuple[int, int, str]:
    where = str(rng.choice(("bottom-right", "bottom-left", "top-right", "top-left", "bottom-centre")))
    mx, my = int(W * rng.uniform(0.01, 0.05)), int(H * rng.uniform(0.01, 0.05))
    x = {"right": W - w - mx, "left": mx, "centre": (W - w) // 2}[where.split("-")[1]]
    y = H - h - my if where.startswith("bottom") else my
    return max(0, x), max(0, y), where


def add_watermark(img: Image.Image, rng: np.random.Generator, kind: str | None = None,
                  strength: str | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """Return (RGB copy of ``img`` with one synthetic watermark, metadata describing it).

    Sizes are relative to the image, so the mark looks the same at any resolution; apply
    :func:`augment_like_reddit` afterwards to get what a viewer would download.
    """
    kind = kind or str(rng.choice(KINDS))
    if kind not in KINDS:
        raise ValueError(f"unknown watermark kind {kind!r}; one of {KINDS}")
    strength = strength or ("faint" if rng.random() < 0.5 else "strong")
    if strength not in STRENGTHS:
        raise ValueError(f"unknown strength {strength!r}; one of {STRENGTHS}")
    base = img.convert("RGB")
    W, H = base.size
    short = min(W, H)
    lo, hi = FAINT_OPACITY if strength == "faint" else STRONG_OPACITY
    opacity = float(rng.uniform(lo, hi))
    colour = _colour(rng)
    overlay = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    meta: dict[str, Any] = {"kind": kind, "strength": strength, "opacity": round(opacity, 3), "colour": colour}
    outline = strength == "strong" and rng.random() < 0.35

    if kind == "corner":
        height = int(short * rng.uniform(0.025, 0.07))
        if rng.random() < 0.2:
            layer = _signature_layer(int(height * 1.8), colour, rng)
            meta.update(mark="signature", font=None, text=None)
        else:
            font, fname = _pick_font(rng, height)
            text = random_text(rng)
            layer = _text_layer(text, font, colour, rng, outline)
            meta.update(mark="text", font=fname, text=text)
        if layer.width > W * 0.6:
            s = W * 0.6 / layer.width
            layer = layer.resize((max(1, int(layer.width * s)), max(1, int(layer.height * s))))
        layer = _rotate(layer, float(rng.choice((0.0, 0.0, 0.0, rng.uniform(-12, 12), 90.0))))
        x, y, where = _corner_xy(rng, W, H, layer.width, layer.height)
        overlay.alpha_composite(layer, (x, y))
        meta.update(position=where, bbox=(x, y, x + layer.width, y + layer.height))
    elif kind == "centre":
        height = int(short * rng.uniform(0.06, 0.16))
        font, fname = _pick_font(rng, height)
        text = random_text(rng)
        layer = _text_layer(text, font, colour, rng, outline)
        if layer.width > W * 0.9:
            s = W * 0.9 / layer.width
            layer = layer.resize((max(1, int(layer.width * s)), max(1, int(layer.height * s))))
        layer = _rotate(layer, float(rng.uniform(-35, 35)) if rng.random() < 0.5 else 0.0)
        x = int((W - layer.width) / 2 + rng.uniform(-0.08, 0.08) * W)
        y = int((H - layer.height) / 2 + rng.uniform(-0.08, 0.08) * H)
        x, y = max(0, min(x, W - layer.width)), max(0, min(y, H - layer.height))
        piece, dest = _clip_paste(layer, x, y, W, H)
        overlay.alpha_composite(piece, dest)
        meta.update(mark="text", font=fname, text=text, position="centre",
                    bbox=(x, y, x + layer.width, y + layer.height))
    elif kind == "tiled":
        height = int(short * rng.uniform(0.025, 0.07))
        font, fname = _pick_font(rng, height)
        text = random_text(rng)
        angle = float(rng.choice((0.0, rng.uniform(-45, 45), 30.0, -30.0)))
        layer = _rotate(_text_layer(text, font, colour, rng, outline=False), angle)
        step_x = int(layer.width * rng.uniform(1.2, 2.2)) + 1
        step_y = int(layer.height * rng.uniform(1.5, 3.5)) + 1
        count = 0
        for row, y in enumerate(range(-layer.height // 2, H, step_y)):
            shift = (step_x // 2) if row % 2 else 0
            for x in range(-layer.width // 2 - shift, W, step_x):
                piece, dest = _clip_paste(layer, x, y, W, H)
                overlay.alpha_composite(piece, dest)
                count += 1
        meta.update(mark="text", font=fname, text=text, position="tiled", angle=round(angle, 1), tiles=count,
                    bbox=(0, 0, W, H))
    else:  # logo
        size = int(short * rng.uniform(0.08, 0.2))
        layer, shape = _logo_layer(size, colour, rng)
        if layer.width > W * 0.7:
            s = W * 0.7 / layer.width
            layer = layer.resize((max(1, int(layer.width * s)), max(1, int(layer.height * s))))
        if rng.random() < 0.3:
            layer = _rotate(layer, float(rng.uniform(-25, 25)))
        if rng.random() < 0.7:
            x, y, where = _corner_xy(rng, W, H, layer.width, layer.height)
        else:
            x, y, where = (W - layer.width) // 2, (H - layer.height) // 2, "centre"
        overlay.alpha_composite(layer, (x, y))
        meta.update(mark=shape, font=None, text=None, position=where, bbox=(x, y, x + layer.width, y + layer.height))

    meta.update(ensure_contrast(overlay, base, colour))
    alpha = overlay.getchannel("A").point(lambda a: int(a * opacity + 0.5))
    overlay.putalpha(alpha)
    out = base.convert("RGBA")
    out.alpha_composite(overlay)
    return out.convert("RGB"), meta


def ink_contrast(overlay: Image.Image, base: Image.Image) -> float:
    """Mean luminance difference between the ink and the photo right under it, weighted by coverage."""
    box = overlay.getchannel("A").getbbox()
    if box is None:
        return 0.0
    ink = np.asarray(overlay.crop(box), np.float32)
    under = np.asarray(base.crop(box).convert("RGB"), np.float32)
    weight = ink[..., 3]
    diff = np.abs(ink[..., :3] @ _LUMA - under @ _LUMA)
    return float((diff * weight).sum() / weight.sum())


def ensure_contrast(overlay: Image.Image, base: Image.Image, colour: tuple[int, int, int]) -> dict[str, Any]:
    """Recolour ``overlay`` (in place, alpha kept) when its ink would vanish into ``base``.

    The inverse colours are tried first, which keeps an outline's relation to its fill; if the
    photo under the mark is mid-grey, plain white or black, whichever is farther from it.
    """
    contrast = ink_contrast(overlay, base)
    if contrast >= MIN_CONTRAST:
        return {"contrast": round(contrast, 1)}
    colour = (255 - colour[0], 255 - colour[1], 255 - colour[2])
    alpha = overlay.getchannel("A")
    recoloured = overlay.convert("RGB").point(lambda v: 255 - v)
    recoloured.putalpha(alpha)
    now = ink_contrast(recoloured, base)
    if now < MIN_CONTRAST:
        box = alpha.getbbox()  # None (no ink at all) measures the whole photo
        under = float(np.asarray(base.crop(box).convert("L"), np.float32).mean())
        value = 0 if under > 127 else 255
        colour = (value, value, value)
        recoloured = Image.new("RGBA", overlay.size, (value, value, value, 0))
        recoloured.putalpha(alpha)
        now = ink_contrast(recoloured, base)
    overlay.paste(recoloured)
    return {"contrast": round(now, 1), "recoloured_from": round(contrast, 1), "colour": colour}


def _clip_paste(layer: Image.Image, x: int, y: int, W: int, H: int) -> tuple[Image.Image, tuple[int, int]]:
    """alpha_composite needs a non-negative destination: crop the part of ``layer`` inside the canvas."""
    left, top = max(0, -x), max(0, -y)
    right, bottom = min(layer.width, W - x), min(layer.height, H - y)
    if right <= left or bottom <= top:
        return Image.new("RGBA", (1, 1), (0, 0, 0, 0)), (0, 0)
    return layer.crop((left, top, right, bottom)), (x + left, y + top)


def augment_like_reddit(img: Image.Image, rng: np.random.Generator, long_side: tuple[int, int] = (640, 2048),
                        quality: tuple[int, int] = (60, 95)) -> tuple[Image.Image, dict[str, Any]]:
    """Resize (long side drawn from ``long_side``, never upscaled) and recompress as JPEG, like Reddit previews."""
    target = int(rng.integers(long_side[0], long_side[1] + 1))
    q = int(rng.integers(quality[0], quality[1] + 1))
    img = img.convert("RGB")
    W, H = img.size
    scale = min(1.0, target / max(W, H))
    if scale < 1.0:
        img = img.resize((max(1, round(W * scale)), max(1, round(H * scale))), Image.BILINEAR, reducing_gap=2.0)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=q)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out.convert("RGB"), {"long_side": max(out.size), "jpeg_quality": q}


def make_example(img: Image.Image, rng: np.random.Generator, positive: bool, kind: str | None = None,
                 strength: str | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """One training/evaluation example: optionally watermarked, always served-like (resize + JPEG)."""
    meta: dict[str, Any] = {"label": int(positive)}
    if positive:
        img, wm = add_watermark(img, rng, kind=kind, strength=strength)
        meta.update(wm)
    else:
        meta.update(kind="clean", strength="none")
    img, aug = augment_like_reddit(img, rng)
    meta.update(aug)
    return img, meta


# ------------------------------------------------------------------ text that belongs to the scene
SURFACES = ("sign", "page", "board", "label")
_SCENE_WORDS = ("OPEN", "Cafe", "Menu", "EXIT", "Street", "Trail", "Parking", "Coffee", "Tea", "Beer", "Welcome",
                "Park", "North", "km", "Hotel", "Station", "Road", "Lake", "Bar", "Soup", "Daily", "Special", "Pizza",
                "Summit", "Harbour", "Ferry", "Museum", "Chapter", "the", "and", "of", "to", "Market", "Bakery")
_SIGN_COLOURS = (((0, 102, 51), (255, 255, 255)), ((250, 250, 245), (20, 20, 20)), ((110, 70, 35), (245, 235, 200)),
                 ((250, 205, 0), (15, 15, 15)), ((180, 20, 25), (255, 255, 255)), ((20, 50, 130), (255, 255, 255)))


def _perspective_coeffs(dst: np.ndarray, w: int, h: int) -> list[float]:
    """Coefficients for ``Image.transform(PERSPECTIVE)`` mapping the quad ``dst`` back onto a w x h rectangle."""
    src = np.array([(0, 0), (w, 0), (w, h), (0, h)], dtype=np.float64)
    rows = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return [float(c) for c in np.linalg.solve(np.asarray(rows), src.reshape(-1))]


def _colour_dark(rng: np.random.Generator) -> tuple[int, int, int]:
    v = int(rng.integers(10, 70))
    return (v, v, v + int(rng.integers(0, 60)))


def _surface(kind: str, short: int, rng: np.random.Generator) -> Image.Image:
    """An opaque object with printed or written text on it: a sign, a page, a chalk/menu board, a label."""
    if kind == "page":
        w = int(short * rng.uniform(0.3, 0.8))
        h = int(w * rng.uniform(1.2, 1.5))
        v = int(rng.integers(215, 250))
        back, ink = (v, v - int(rng.integers(0, 12)), v - int(rng.integers(0, 25))), _colour_dark(rng)
        lines = int(rng.integers(8, 26))
    elif kind == "board":
        w = int(short * rng.uniform(0.25, 0.6))
        h = int(w * rng.uniform(1.0, 1.5))
        v = int(rng.integers(15, 60))
        back, ink = (v, v + int(rng.integers(0, 20)), v), (235, 235, 225)
        lines = int(rng.integers(4, 12))
    elif kind == "sign":
        w = int(short * rng.uniform(0.2, 0.55))
        h = int(w * rng.uniform(0.3, 0.8))
        back, ink = _SIGN_COLOURS[int(rng.integers(len(_SIGN_COLOURS)))]
        lines = int(rng.integers(1, 4))
    else:  # label: a small plate, sticker or shop sign
        w = int(short * rng.uniform(0.08, 0.25))
        h = int(w * rng.uniform(0.3, 0.7))
        back, ink = _SIGN_COLOURS[int(rng.integers(len(_SIGN_COLOURS)))]
        lines = int(rng.integers(1, 3))
    w, h = max(24, w), max(16, h)
    surface = Image.new("RGBA", (w, h), (*back, 255))
    draw = ImageDraw.Draw(surface)
    if kind in ("sign", "label") and rng.random() < 0.6:  # a border, as signs have
        line = max(1, w // 60)
        draw.rectangle((line * 2, line * 2, w - 1 - line * 2, h - 1 - line * 2), outline=(*ink, 255), width=line)
    margin = int(w * 0.08)
    line_h = (h - 2 * margin) / lines
    font_px = max(6, int(line_h * rng.uniform(0.5, 0.8)))
    font, _ = _pick_font(rng, font_px)
    for i in range(lines):
        y = margin + i * line_h
        if kind in ("page", "board") and rng.random() < 0.25:  # handwriting on the same surface
            layer = _signature_layer(int(line_h), ink, rng)
        else:
            words = [_name(rng) if rng.random() < 0.4 else str(rng.choice(_SCENE_WORDS))
                     for _ in range(int(rng.integers(1, 7)))]
            text = " ".join(words)
            if kind == "board" and rng.random() < 0.5:
                text += f"  {rng.integers(2, 30)}.{rng.integers(0, 10)}0"
            layer = _text_layer(text, font, ink, rng, outline=False)
        if layer.width > w - 2 * margin:
            layer = layer.crop((0, 0, w - 2 * margin, layer.height))
        x = margin if kind != "sign" else max(margin, (w - layer.width) // 2)
        surface.alpha_composite(layer, (int(x), int(y)))
    return surface


def add_scene_text(img: Image.Image, rng: np.random.Generator, kind: str | None = None,
                   ) -> tuple[Image.Image, dict[str, Any]]:
    """Return (RGB copy of ``img`` with text that is part of the scene, metadata): still a clean photo.

    Real photos hold signs, menus, book pages and labels, and a detector trained only on clean
    photos without text learns "text means watermark" (the held-out errors of the fine-tuned CNN
    were exactly such photos). Scene text differs from a mark in how it was made: it sits on an
    opaque object with edges, seen in perspective, lit unevenly and as sharp as the rest of the
    photo, never blended over it. Those are what this draws.
    """
    kind = kind or str(rng.choice(SURFACES))
    if kind not in SURFACES:
        raise ValueError(f"unknown scene-text surface {kind!r}; one of {SURFACES}")
    base = img.convert("RGB")
    W, H = base.size
    surface = _surface(kind, min(W, H), rng)
    w, h = surface.size
    # Seen in perspective: each corner moves by up to a fifth of the surface, then a turn.
    jitter = rng.uniform(-0.2, 0.2, (4, 2)) * np.array([w, h])
    quad = np.array([(0, 0), (w, 0), (w, h), (0, h)], dtype=np.float64) + jitter
    angle = math.radians(float(rng.uniform(-15, 15)))
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    quad = quad @ rot.T
    quad -= quad.min(axis=0)
    bw, bh = math.ceil(quad[:, 0].max()) + 1, math.ceil(quad[:, 1].max()) + 1
    warped = surface.transform((bw, bh), Image.PERSPECTIVE, _perspective_coeffs(quad, w, h), Image.BICUBIC)
    # Uneven light across the object, and the photo's own softness.
    gx = np.linspace(rng.uniform(0.55, 1.1), rng.uniform(0.55, 1.1), bw)[None, :]
    gy = np.linspace(rng.uniform(0.8, 1.05), rng.uniform(0.8, 1.05), bh)[:, None]
    rgb = np.asarray(warped.convert("RGB"), dtype=np.float32) * (gx * gy)[..., None]
    rgb += rng.normal(0, rng.uniform(1, 6), rgb.shape)
    lit = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    lit.putalpha(warped.getchannel("A"))
    lit = lit.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.4))))
    x = int(rng.integers(-bw // 5, max(1, W - bw * 4 // 5)))
    y = int(rng.integers(-bh // 5, max(1, H - bh * 4 // 5)))
    piece, dest = _clip_paste(lit, x, y, W, H)
    out = base.convert("RGBA")
    out.alpha_composite(piece, dest)
    return out.convert("RGB"), {"scene_text": kind, "bbox": (x, y, x + bw, y + bh)}
