"""Photo-like clean images for tests that must not need ../shared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def fake_photo(rng: np.random.Generator, w: int = 640, h: int = 420) -> Image.Image:
    """Smooth colour fields with soft blobs, no text: clean, like a photo, for watermark tests."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    c0, c1 = rng.uniform(40, 220, 3), rng.uniform(40, 220, 3)
    t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None]
    img = c0 + (c1 - c0) * (t - t.min()) / (np.ptp(t) + 1e-6)
    coarse = rng.normal(0, 25, (h // 60 + 2, w // 60 + 2, 3))
    img += np.asarray(Image.fromarray(((coarse + 128).clip(0, 255)).astype(np.uint8)).resize((w, h),
                      Image.BICUBIC), dtype=np.float64) - 128
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def fake_photo_dir(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` fake photos saved as JPEG under ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        fake_photo(rng).save(folder / f"p{i}.jpg", quality=92)
    return folder
