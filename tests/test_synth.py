"""Synthetic watermarks: deterministic given the rng, varied across draws, drawn in pinned fonts."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mining import synth


@pytest.fixture
def photo() -> Image.Image:
    """A smooth, photo-like clean image (gradient + low-frequency noise), 800x520."""
    rng = np.random.default_rng(7)
    h, w = 520, 800
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([120 + 80 * xx, 140 + 60 * yy, 170 - 50 * xx * yy], axis=-1)
    noise = np.kron(rng.normal(0, 18, (h // 40 + 1, w // 40 + 1, 3)), np.ones((40, 40, 1)))[:h, :w]
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _all_faces() -> list[str]:
    return [face for family in synth.font_families() for face in family]


def _diff(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max(axis=-1)


def test_same_rng_state_gives_identical_image_and_meta(photo: Image.Image) -> None:
    a, ma = synth.make_example(photo, np.random.default_rng(42), True)
    b, mb = synth.make_example(photo, np.random.default_rng(42), True)
    assert ma == mb
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kind", synth.KINDS)
@pytest.mark.parametrize("strength", synth.STRENGTHS)
def test_each_kind_marks_the_image_inside_its_box(photo: Image.Image, kind: str, strength: str) -> None:
    out, meta = synth.add_watermark(photo, np.random.default_rng(3), kind=kind, strength=strength)
    assert out.size == photo.size and out.mode == "RGB"
    assert meta["kind"] == kind and meta["strength"] == strength
    lo, hi = synth.FAINT_OPACITY if strength == "faint" else synth.STRONG_OPACITY
    assert lo <= meta["opacity"] <= hi
    changed = _diff(out, photo) > 2
    assert changed.sum() > 30, "the watermark must change some pixels"
    x0, y0, x1, y1 = meta["bbox"]
    inside = changed[max(0, y0):y1, max(0, x0):x1].sum()
    assert inside >= 0.95 * changed.sum(), "ink outside the reported bounding box"


@pytest.mark.parametrize("kind", synth.KINDS)
def test_a_mark_in_the_photos_own_tone_is_recoloured_until_it_shows(kind: str) -> None:
    """Dark ink on a dark photo is no watermark; the synthesiser must not label it as one."""
    dark = Image.new("RGB", (900, 600), (28, 30, 26))
    light = Image.new("RGB", (900, 600), (235, 236, 230))
    recoloured = 0
    for seed in range(12):
        for plain in (dark, light):
            out, meta = synth.add_watermark(plain, np.random.default_rng(seed), kind=kind)
            assert meta["contrast"] >= synth.MIN_CONTRAST, meta
            ink = _diff(out, plain)
            assert ink.max() >= synth.MIN_CONTRAST * meta["opacity"] * 0.8, "the mark must show at its opacity"
            recoloured += "recoloured_from" in meta
    assert recoloured, "some draws pick an ink like the photo's"


def test_contrast_keeps_a_visible_mark_as_drawn(photo: Image.Image) -> None:
    """Recolouring only touches marks that would vanish: others keep their colour, and the rng stream."""
    overlay = Image.new("RGBA", photo.size, (0, 0, 0, 0))
    overlay.paste((255, 255, 255, 255), (100, 100, 300, 140))
    grey = Image.new("RGB", photo.size, (60, 60, 60))
    before = np.asarray(overlay).copy()
    assert synth.ensure_contrast(overlay, grey, (255, 255, 255)) == {"contrast": 195.0}
    assert np.array_equal(np.asarray(overlay), before)
    near = Image.new("RGB", photo.size, (250, 250, 250))  # white on white: inverted to black
    meta = synth.ensure_contrast(overlay, near, (255, 255, 255))
    assert meta["colour"] == (0, 0, 0) and meta["recoloured_from"] == 5.0 and meta["contrast"] == 250.0
    assert np.asarray(overlay)[120, 200].tolist() == [0, 0, 0, 255]
    mid = Image.new("RGB", photo.size, (120, 120, 120))  # mid-grey ink on mid-grey: neither it nor its inverse
    overlay.paste((125, 125, 125, 255), (100, 100, 300, 140))
    assert synth.ensure_contrast(overlay, mid, (125, 125, 125))["colour"] == (255, 255, 255)  # the farther
    a = synth.add_watermark(photo, np.random.default_rng(4))[1]
    b = synth.add_watermark(Image.new("RGB", photo.size, (0, 0, 0)), np.random.default_rng(4))[1]
    assert {k: v for k, v in a.items() if k not in ("colour", "contrast", "recoloured_from")} == \
        {k: v for k, v in b.items() if k not in ("colour", "contrast", "recoloured_from")}


def test_faint_marks_change_pixels_less_than_strong(photo: Image.Image) -> None:
    faint, strong = [], []
    for seed in range(6):
        for strength, acc in (("faint", faint), ("strong", strong)):
            out, _ = synth.add_watermark(photo, np.random.default_rng(seed), kind="centre", strength=strength)
            d = _diff(out, photo)
            acc.append(d[d > 2].mean())
    assert np.mean(faint) < np.mean(strong)


def test_draws_vary_kinds_fonts_positions_and_texts(photo: Image.Image) -> None:
    rng = np.random.default_rng(0)
    small = photo.resize((400, 260))
    metas = [synth.add_watermark(small, rng)[1] for _ in range(60)]
    kinds = Counter(m["kind"] for m in metas)
    assert set(kinds) == set(synth.KINDS)
    assert len({m.get("text") for m in metas if m.get("text")}) >= 20
    assert len({m.get("position") for m in metas}) >= 4
    assert len({m["strength"] for m in metas}) == 2
    fonts = {m.get("font") for m in metas if m.get("font")}
    assert len(fonts) >= min(5, 1 + len(_all_faces()))


def test_fonts_are_the_pinned_wheels_never_the_machines() -> None:
    """The same faces on every machine: installing a browser must not change the examples."""
    families = synth.font_families()
    assert len(families) == len(synth.FONT_PACKAGES) and all(families)
    for package, family in zip(synth.FONT_PACKAGES, families, strict=True):
        assert all(f"/{package}/files/" in face for face in family)
        assert len({Path(face).stem for face in family}) == len(family), "one file per face"
    assert not any(face.startswith("/usr/share/fonts") for face in _all_faces())


def test_a_missing_font_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth, "FONT_PACKAGES", (*synth.FONT_PACKAGES, "font_not_installed_anywhere"))
    synth.font_families.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="font_not_installed_anywhere"):
            synth.font_families()
    finally:
        synth.font_families.cache_clear()


def test_an_unreadable_face_falls_back_to_pillows_builtin(photo: Image.Image, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "Broken.ttf"
    broken.write_bytes(b"not a font")
    monkeypatch.setattr(synth, "font_families", lambda: ((str(broken),),))
    synth._font.cache_clear()
    try:
        out, meta = synth.add_watermark(photo, np.random.default_rng(5), kind="corner", strength="strong")
    finally:
        synth._font.cache_clear()
    assert meta.get("font") in ("builtin", "Broken", None)
    assert (_diff(out, photo) > 2).sum() > 30


def test_augment_resizes_within_range_and_recompresses(photo: Image.Image) -> None:
    big = photo.resize((2400, 1560))
    sizes = set()
    for seed in range(8):
        out, meta = synth.augment_like_reddit(big, np.random.default_rng(seed))
        assert 640 <= max(out.size) <= 2048
        assert 60 <= meta["jpeg_quality"] <= 95
        assert abs(out.size[0] / out.size[1] - 2400 / 1560) < 0.01
        sizes.add(out.size)
    assert len(sizes) > 4
    small, _ = synth.augment_like_reddit(photo, np.random.default_rng(1))
    assert small.size == photo.size, "never upscaled"


def test_clean_examples_are_only_recompressed(photo: Image.Image) -> None:
    out, meta = synth.make_example(photo, np.random.default_rng(9), positive=False)
    assert meta["label"] == 0 and meta["kind"] == "clean"
    assert float(_diff(out, photo).mean()) < 6


def test_unknown_kind_is_refused(photo: Image.Image) -> None:
    with pytest.raises(ValueError, match="kind"):
        synth.add_watermark(photo, np.random.default_rng(0), kind="hologram")


@pytest.mark.parametrize("surface", synth.SURFACES)
def test_scene_text_is_an_opaque_object_inside_its_box(photo: Image.Image, surface: str) -> None:
    out, meta = synth.add_scene_text(photo, np.random.default_rng(4), kind=surface)
    again, meta_again = synth.add_scene_text(photo, np.random.default_rng(4), kind=surface)
    assert meta == meta_again and np.array_equal(np.asarray(out), np.asarray(again))
    assert out.size == photo.size and out.mode == "RGB" and meta["scene_text"] == surface
    changed = _diff(out, photo) > 2
    x0, y0, x1, y1 = meta["bbox"]
    inside = changed[max(0, y0):y1, max(0, x0):x1]
    assert inside.sum() >= 0.99 * changed.sum(), "paint outside the reported bounding box"
    # Most of the object replaces the photo (a surface, not a translucent mark over it).
    assert inside.mean() > 0.3


def test_scene_text_kinds_vary_and_unknown_surfaces_are_refused(photo: Image.Image) -> None:
    rng = np.random.default_rng(0)
    kinds = Counter(synth.add_scene_text(photo, rng)[1]["scene_text"] for _ in range(16))
    assert set(kinds) == set(synth.SURFACES)
    with pytest.raises(ValueError, match="surface"):
        synth.add_scene_text(photo, rng, kind="billboard")


# The draws of a fixed seed, per synthesiser version. Every held-out figure is measured on
# these examples: a change that alters them must bump watermark.SYNTH_VERSION (and add its line).
DRAWS_SHA256 = {
    "synth-v3": "10c9ae663163fecdddc452c40fe40c6a188592d93c674dd060959a551f35da5b",
}


def _draws_digest(photo: Image.Image) -> str:
    rng = np.random.default_rng(2026)
    keep = ("kind", "strength", "mark", "font", "text", "position", "tiles")
    metas = []
    for _ in range(24):
        _, meta = synth.add_watermark(photo, rng)
        metas.append({k: meta.get(k) for k in keep} | {"opacity": round(float(meta.get("opacity", 0)), 3)})
    return hashlib.sha256(json.dumps(metas, sort_keys=True).encode()).hexdigest()


def test_the_draws_are_pinned_to_the_synth_version(photo: Image.Image) -> None:
    from mining.watermark import SYNTH_VERSION

    assert SYNTH_VERSION in DRAWS_SHA256, "a new synthesiser version needs its line in DRAWS_SHA256"
    assert _draws_digest(photo) == DRAWS_SHA256[SYNTH_VERSION], (
        "the synthesiser draws other marks than this version did: bump SYNTH_VERSION (figures "
        "measured on the old examples no longer compare)")
