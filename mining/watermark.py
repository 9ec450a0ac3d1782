"""Watermark detection: is this image stamped with text, a signature or a logo?

Two detectors share one interface (:class:`WatermarkDetector`):

* :class:`OnnxClassifierDetector`: the original system's interface: an ONNX classifier
  on 512x512 RGB, ``x/255``, mean/std 0.5, one logit, sigmoid. For users who have such
  a model (it cannot be obtained here).
* :class:`TrainedDetector`, the default: no labelled watermark set or fine-tuned CNN is
  reachable offline, but a real pretrained text detector and recogniser are (PP-OCRv4 det
  and rec, shipped in the ``rapidocr_onnxruntime`` wheel; used only as ONNX files). The
  detector's text probability map at 960 px is summarised per region (corners, centre,
  borders, a tile grid) and by the shape of its connected regions (watermark text is thin,
  straight and often repeated in parallel; false alarms on photos are blobs); the largest
  regions are then cropped and read by the recogniser, because real text reads as
  confident characters and rock texture does not. A small scikit-learn head (MLP) is
  trained on watermarks :mod:`mining.synth` stamps over the user's own clean photos and
  stored as plain arrays (npz) plus JSON metadata, never pickle, so loading a model file
  cannot run code.

Runtime needs onnxruntime, numpy and scikit-learn (its scipy for connected regions);
training is ``train()`` (``mining watermark train --clean DIR``), measurement is
``evaluate()`` (``mining watermark evaluate --clean DIR``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from mining.lake import sha256_file as _file_digest
from mining.settings import Settings

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
OCR_DET_FILE = "ch_PP-OCRv4_det_infer.onnx"
FEATURE_VERSION = "gray+textmap-v1+read-v3"  # what a head was trained on: input enhancement, map summary, reads
MAP_VERSION = "gray-autocontrast+ppocrv4-det-maxpool2-u8+rec8-upright-v3"  # how cached evidence is computed
SYNTH_VERSION = "synth-v3"  # v2: inks recoloured when they would vanish into the photo; v3: pinned fonts
HEAD_FILE = "head.npz"
META_FILE = "meta.json"
DEFAULT_TARGET_FPR = 0.03  # calibration aim on clean images, leaving margin under the 5% promise
DEFAULT_MAX_FPR = 0.05  # the promise itself, kept in FPR_CONFIDENCE of photo resamples (bounded_threshold)
FPR_CONFIDENCE = 0.8


# ----------------------------------------------------------------------------------- interface
class WatermarkDetector:
    """Probability that each image carries a watermark; ``>= threshold`` means reject."""

    name: str = "watermark"
    version: str = "unversioned"
    threshold: float = 0.5

    def predict(self, images: Sequence[Image.Image]) -> np.ndarray:
        raise NotImplementedError

    def predict_paths(self, paths: Sequence[Path | str], batch: int = 4) -> np.ndarray:
        """Probabilities for files, in order; an unreadable file gives NaN, never an exception.

        The next batch decodes on a worker thread while the models run on this one (both
        release the GIL), so decoding costs little wall time; at most two batches are in memory.
        """
        from concurrent.futures import ThreadPoolExecutor

        out = np.full(len(paths), np.nan, dtype=np.float64)
        chunks = [range(s, min(s + batch, len(paths))) for s in range(0, len(paths), batch)]

        def decode(chunk: range) -> tuple[list[Image.Image], list[int]]:
            images, where = [], []
            for i in chunk:
                image = _open_or_warn(paths[i], self.decode_size)
                if image is not None:
                    images.append(image)
                    where.append(i)
            return images, where

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="wm-decode") as pool:
            pending = [pool.submit(decode, chunks[0])] if chunks else []
            for k in range(len(chunks)):
                images, where = pending.pop().result()
                if k + 1 < len(chunks):
                    pending.append(pool.submit(decode, chunks[k + 1]))
                if images:
                    out[where] = self.predict(images)
        return out

    decode_size: int = 1024  # smallest long side the detector needs from the decoder


def open_for_detection(path: Path | str, min_long_side: int) -> Image.Image:
    """Decode an image file to RGB, cheaply: JPEG DCT scaling down to about what is needed."""
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft("RGB", (min_long_side, min_long_side))
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            bg.alpha_composite(im)
            im = bg
        return im.convert("RGB")


def _open_or_warn(path: Path | str, min_long_side: int) -> Image.Image | None:
    """:func:`open_for_detection`, with an unreadable file logged and given as None: per-item failure is data."""
    try:
        return open_for_detection(path, min_long_side)
    except Exception as exc:
        log.warning("watermark: cannot read %s: %s", path, exc)
        return None


def _session(path: Path, threads: int = 0) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads if threads > 0 else (os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # Busy-waiting worker threads starve everything else on a small shared machine.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


# ------------------------------------------------------------------- the original ONNX interface
class OnnxClassifierDetector(WatermarkDetector):
    """An ONNX binary classifier with the original system's contract (512x512, /255, mean/std 0.5, 1 logit)."""

    def __init__(self, model_path: Path | str, threshold: float = 0.5, name: str | None = None,
                 version: str | None = None, input_size: int = 512, threads: int = 0) -> None:
        self.model_path = Path(model_path)
        self.threads = threads if threads > 0 else (os.cpu_count() or 1)
        self.session = _session(self.model_path, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.input_size = input_size
        self.threshold = float(threshold)
        self.name = name or self.model_path.stem
        self.version = version or f"{self.name}@{_file_digest(self.model_path)[:12]}"
        self.decode_size = input_size
        self._lanes: list[Any] = []  # single-threaded sessions for predict_paths, made on first use

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """NCHW float32 of ``x/255``, mean/std 0.5, written in place: no float temporaries per image."""
        s = self.input_size
        batch = np.empty((len(images), 3, s, s), dtype=np.float32)
        for i, im in enumerate(images):
            pixels = np.asarray(im.convert("RGB").resize((s, s), Image.BILINEAR), dtype=np.uint8)
            np.multiply(pixels.transpose(2, 0, 1), np.float32(1 / 127.5), out=batch[i], casting="unsafe")
        batch -= np.float32(1.0)
        return batch

    def predict(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros(0)
        return self._run(self.session, images)

    def _run(self, session: Any, images: Sequence[Image.Image]) -> np.ndarray:
        logits = session.run(None, {self.input_name: self.preprocess(images)})[0]
        return _sigmoid(np.asarray(logits, dtype=np.float64).reshape(len(images), -1)[:, 0])

    def predict_paths(self, paths: Sequence[Path | str], batch: int = 4) -> np.ndarray:
        """Probabilities for files, in order; an unreadable file gives NaN, never an exception.

        One lane per core, each decoding and scoring one image at a time on its own
        single-threaded session. A 512-px CNN is memory-bound in its high-resolution layers, so
        batch 1 per core beats one session sharing its threads over a batch (22.5 against
        26.6 ms per image on 2 cores, docs/watermark.md), and no lane ever waits for another's
        decoding. Memory is one image per lane; ``batch`` only applies on a single core.
        """
        if self.threads < 2 or len(paths) < 2:
            return super().predict_paths(paths, batch)
        import itertools
        import threading
        from concurrent.futures import ThreadPoolExecutor

        if not self._lanes:
            self._lanes = [_session(self.model_path, 1) for _ in range(self.threads)]
        out = np.full(len(paths), np.nan, dtype=np.float64)
        order, lock = itertools.count(), threading.Lock()

        def lane(session: Any) -> None:
            while True:
                with lock:
                    i = next(order)
                if i >= len(paths):
                    return
                image = _open_or_warn(paths[i], self.decode_size)
                if image is not None:
                    out[i] = self._run(session, [image])[0]

        with ThreadPoolExecutor(max_workers=len(self._lanes), thread_name_prefix="wm-lane") as pool:
            for done in [pool.submit(lane, session) for session in self._lanes]:
                done.result()  # a model failure is run-level: re-raised here
        return out


class CnnDetector(OnnxClassifierDetector):
    """The fine-tuned watermark CNN (`mining watermark finetune`): the original interface, plus its meta.

    The meta carries the calibrated threshold and the photos it trained and calibrated on, so
    ``evaluate`` measures it on unseen photos only.
    """

    name = "watermark-cnn"
    model_file = "model.onnx"

    def __init__(self, model_path: Path | str, meta: dict[str, Any], threads: int = 0) -> None:
        super().__init__(model_path, threshold=float(meta["threshold"]), name=self.name,
                         version=str(meta["version"]), input_size=int(meta.get("input_size", 512)), threads=threads)
        self.meta = meta

    @classmethod
    def load(cls, directory: Path, threads: int = 0) -> CnnDetector:
        meta = json.loads((directory / META_FILE).read_text())
        return cls(directory / cls.model_file, meta, threads=threads)

    @classmethod
    def save(cls, directory: Path, model: bytes, meta: dict[str, Any]) -> Path:
        return replace_dir(directory, {cls.model_file: model, META_FILE: _meta_bytes(meta)})


# ------------------------------------------------------------------------- text-map features
def find_text_detector(settings: Settings | None = None) -> Path | None:
    """The PP-OCRv4 det ONNX: the model registry's copy under models/, else the installed wheel's file."""
    candidates: list[Path] = []
    if settings is not None:
        try:
            from mining.models import model_path  # type: ignore[attr-defined]

            for name in ("ppocr-v4-det",):
                try:
                    candidates.append(Path(model_path(settings, name)))
                except Exception:  # not registered under this name
                    continue
        except ImportError:
            pass
        candidates.append(settings.models_dir / OCR_DET_FILE)
        if settings.models_dir.is_dir():
            candidates.extend(sorted(settings.models_dir.glob(f"**/{OCR_DET_FILE}")))
    spec = importlib.util.find_spec("rapidocr_onnxruntime")  # locates the wheel without importing it
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "models" / OCR_DET_FILE)
    return next((p for p in candidates if p.is_file()), None)


# Regions as (x0, y0, x1, y1) fractions of the image: where watermarks live.
REGIONS: dict[str, tuple[float, float, float, float]] = {
    "full": (0, 0, 1, 1),
    "top_left": (0, 0, 0.35, 0.3), "top_right": (0.65, 0, 1, 0.3),
    "bottom_left": (0, 0.7, 0.35, 1), "bottom_right": (0.65, 0.7, 1, 1),
    "bottom_centre": (0.3, 0.8, 0.7, 1),
    "centre": (0.25, 0.25, 0.75, 0.75),
    "top": (0, 0, 1, 0.15), "bottom": (0, 0.85, 1, 1), "left": (0, 0, 0.15, 1), "right": (0.85, 0, 1, 1),
}
REGION_STATS = ("max", "mean", "q99", "q999", "frac10", "frac30", "frac60")
GRID = 4
COMPONENT_FEATURES = (
    "n_components", "n_textlike", "n_textlike_border", "n_textlike_centre", "textlike_area", "blob_area",
    "max_elongation", "max_rect_elongated", "best_text_score", "max_parallel", "text_len_max", "text_width_median",
    "text_prob_max", "largest_area", "largest_elongation", "largest_rect",
)


def component_features(p: np.ndarray, level: float = 0.3) -> np.ndarray:
    """Shape of the connected regions above ``level``: watermark text is thin, straight, rectangular
    and often repeated in parallel; the detector's false alarms on photos are blobs."""
    from scipy import ndimage

    h, w = p.shape
    labels, n = ndimage.label(p > level)
    out = np.zeros(len(COMPONENT_FEATURES), dtype=np.float32)
    if n == 0:
        return out
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs]
    area = np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)
    keep = area >= 4
    if not keep.any():
        return out

    def mean(v: np.ndarray) -> np.ndarray:
        return np.bincount(lab, weights=v, minlength=n + 1)[1:] / np.maximum(area, 1)

    mx, my = mean(xs.astype(np.float64)), mean(ys.astype(np.float64))
    cxx = mean(xs.astype(np.float64) ** 2) - mx**2 + 1 / 12
    cyy = mean(ys.astype(np.float64) ** 2) - my**2 + 1 / 12
    cxy = mean(xs.astype(np.float64) * ys) - mx * my
    tr, det = cxx + cyy, cxx * cyy - cxy**2
    disc = np.sqrt(np.maximum(tr**2 / 4 - det, 0))
    l1, l2 = tr / 2 + disc, np.maximum(tr / 2 - disc, 1e-6)
    length, width = np.sqrt(12 * l1), np.sqrt(12 * l2)
    elong = length / width
    rect = area / np.maximum(length * width, 1e-6)
    angle = np.degrees(0.5 * np.arctan2(2 * cxy, cxx - cyy)) % 180
    prob = mean(p[ys, xs].astype(np.float64))
    text = keep & (elong >= 2.5) & (rect >= 0.7) & (area >= 6)
    fx, fy = mx / w, my / h
    border = ((fx < 0.35) | (fx > 0.65)) & ((fy < 0.3) | (fy > 0.7)) | (fy > 0.8) | (fy < 0.12)
    centre = (np.abs(fx - 0.5) < 0.25) & (np.abs(fy - 0.5) < 0.25)
    big = np.argmax(np.where(keep, area, -1))
    elongated = keep & (elong >= 2)
    parallel = np.bincount((angle[text] // 10).astype(int) % 18, minlength=18).max() if text.any() else 0
    out[:] = [
        np.log1p(keep.sum()), np.log1p(text.sum()), np.log1p((text & border).sum()), np.log1p((text & centre).sum()),
        area[text].sum() / (h * w), area[keep & ~text].sum() / (h * w),
        min(elong[keep].max(), 20.0), rect[elongated].max() if elongated.any() else 0.0,
        float(np.max(np.minimum(elong, 10) * np.minimum(rect, 1.2) * prob * keep)),
        np.log1p(parallel), length[text].max() / w if text.any() else 0.0,
        np.median(width[text]) / h if text.any() else 0.0, prob[text].max() if text.any() else 0.0,
        area[big] / (h * w), min(elong[big], 20.0), rect[big],
    ]
    return out


def enhance(image: Image.Image, cutoff: float = 0.5) -> Image.Image:
    """Grey levels stretched to the full range: what the text models look at.

    PP-OCRv4 was trained on legible scene text; a pale mark on a pale photo (white text over
    sky) gives it nothing at all, yet the same pixels stretched read plainly. On the held-out
    synthetic set it catches more marks at the shipped threshold (60% vs 53% recall at the same
    false-positive rates); the ranking (AUROC) is unchanged within noise (docs/watermark.md).
    """
    return ImageOps.autocontrast(image.convert("L"), cutoff=cutoff).convert("RGB")


class TextMapFeatures:
    """PP-OCRv4 text probability map -> fixed-length region statistics (numpy only)."""

    def __init__(self, model_path: Path | str, long_side: int = 960, threads: int = 0) -> None:
        self.model_path = Path(model_path)
        self.long_side = long_side
        self.session = _session(self.model_path, threads)
        self.input_name = self.session.get_inputs()[0].name

    @property
    def names(self) -> list[str]:
        names = [f"{r}.{s}" for r in REGIONS for s in REGION_STATS]
        names += [f"grid_max_rank{i}" for i in range(GRID * GRID)]
        names += [f"grid_frac30_rank{i}" for i in range(GRID * GRID)]
        names += ["rows_active", "cols_active", "border_vs_centre"]
        names += [f"cc.{n}" for n in COMPONENT_FEATURES] + [f"cc60.{n}" for n in COMPONENT_FEATURES]
        return names

    def det_input(self, image: Image.Image) -> np.ndarray:
        """The detector's input tensor: long side ``long_side``, both sides multiples of 32."""
        w, h = image.size
        scale = self.long_side / max(w, h)
        W, H = max(32, round(w * scale / 32) * 32), max(32, round(h * scale / 32) * 32)
        x = np.asarray(image.convert("RGB").resize((W, H), Image.BILINEAR), dtype=np.float32)
        x = x[:, :, ::-1] / 127.5 - 1.0  # the PaddleOCR det contract: BGR, /255, mean/std 0.5
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None])

    def prob_map(self, image: Image.Image) -> np.ndarray:
        """The detector's text probability per pixel at ``long_side`` resolution (float32)."""
        return np.asarray(self.session.run(None, {self.input_name: self.det_input(image)})[0][0, 0], dtype=np.float32)

    def text_map(self, image: Image.Image) -> np.ndarray:
        return self.to_text_map(self.prob_map(image))

    @staticmethod
    def to_text_map(p: np.ndarray) -> np.ndarray:
        """2x2 max-pooled probability map as uint8: peaks kept, 8x smaller to cache than float32."""
        h, w = p.shape
        pooled = p[: h // 2 * 2, : w // 2 * 2].reshape(h // 2, 2, w // 2, 2).max(axis=(1, 3))
        return (pooled * 255 + 0.5).astype(np.uint8)

    @staticmethod
    def map_features(text_map: np.ndarray) -> np.ndarray:
        """Region statistics of a :meth:`text_map` (uint8 or [0, 1] floats)."""
        p = text_map.astype(np.float32) / 255.0 if text_map.dtype == np.uint8 else text_map
        h, w = p.shape
        out: list[float] = []
        for x0, y0, x1, y1 in REGIONS.values():
            r = p[int(y0 * h): max(int(y0 * h) + 1, int(y1 * h)), int(x0 * w): max(int(x0 * w) + 1, int(x1 * w))]
            flat = r.ravel()
            q99, q999 = np.quantile(flat, (0.99, 0.999))
            out += [float(flat.max()), float(flat.mean()), float(q99), float(q999),
                    float((flat > 0.1).mean()), float((flat > 0.3).mean()), float((flat > 0.6).mean())]
        gmax, gfrac = [], []
        for i in range(GRID):
            for j in range(GRID):
                t = p[i * h // GRID: (i + 1) * h // GRID, j * w // GRID: (j + 1) * w // GRID]
                gmax.append(float(t.max()))
                gfrac.append(float((t > 0.3).mean()))
        out += sorted(gmax, reverse=True) + sorted(gfrac, reverse=True)
        rows = (p > 0.3).any(axis=1).mean()
        cols = (p > 0.3).any(axis=0).mean()
        centre = p[h // 4: 3 * h // 4, w // 4: 3 * w // 4].mean()
        out += [float(rows), float(cols), float(p.mean() - centre)]
        return np.concatenate([np.asarray(out, dtype=np.float32), component_features(p, 0.3),
                               component_features(p, 0.6)])


OCR_REC_FILE = "ch_PP-OCRv4_rec_infer.onnx"
READ_FEATURES = ("read_best_conf", "read_best_chars", "read_n_conf50", "read_n_conf80", "read_chars_conf80",
                 "read_mean_conf", "read_best_textlike_conf", "read_second_conf", "read_third_conf",
                 "read_best_border_conf", "read_best_centre_conf")
MAX_READ = 8  # regions read per image: the largest candidates


def find_text_recogniser(settings: Settings | None = None) -> Path | None:
    """The PP-OCRv4 recogniser ONNX: the registry's copy (``ppocr-v4-rec``) or the installed wheel's file."""
    candidates: list[Path] = []
    if settings is not None:
        try:
            from mining.models import model_path  # type: ignore[attr-defined]

            candidates.append(Path(model_path(settings, "ppocr-v4-rec")))
        except Exception:  # not registered or not installed
            pass
        candidates.append(settings.models_dir / OCR_REC_FILE)
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "models" / OCR_REC_FILE)
    return next((p for p in candidates if p.is_file()), None)


def text_regions(text_map: np.ndarray, level: float = 0.3, limit: int = MAX_READ) -> list[dict[str, float]]:
    """Oriented boxes (map pixels) of the largest regions above ``level``, biggest first."""
    from scipy import ndimage

    p = text_map.astype(np.float32) / 255.0 if text_map.dtype == np.uint8 else text_map
    labels, n = ndimage.label(p > level)
    if n == 0:
        return []
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs]
    area = np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)

    def mean(v: np.ndarray) -> np.ndarray:
        return np.bincount(lab, weights=v, minlength=n + 1)[1:] / np.maximum(area, 1)

    fx, fy = xs.astype(np.float64), ys.astype(np.float64)
    mx, my = mean(fx), mean(fy)
    cxx, cyy = mean(fx**2) - mx**2 + 1 / 12, mean(fy**2) - my**2 + 1 / 12
    cxy = mean(fx * fy) - mx * my
    tr, det = cxx + cyy, cxx * cyy - cxy**2
    disc = np.sqrt(np.maximum(tr**2 / 4 - det, 0))
    length, width = np.sqrt(12 * (tr / 2 + disc)), np.sqrt(12 * np.maximum(tr / 2 - disc, 1e-6))
    angle = np.degrees(0.5 * np.arctan2(2 * cxy, cxx - cyy))
    rect = area / np.maximum(length * width, 1e-6)
    order = [i for i in np.argsort(-area) if area[i] >= 6][:limit]
    return [{"x": mx[i], "y": my[i], "length": length[i], "width": width[i], "angle": angle[i],
             "textlike": float(length[i] / width[i] >= 2.5 and rect[i] >= 0.7)} for i in order]


class TextReader:
    """PP-OCRv4 recogniser as a verifier: real text reads as confident characters, texture does not."""

    def __init__(self, model_path: Path | str, threads: int = 0) -> None:
        self.model_path = Path(model_path)
        self.session = _session(self.model_path, threads)
        self.input_name = self.session.get_inputs()[0].name

    @staticmethod
    def crop(image: Image.Image, region: dict[str, float], map_shape: tuple[int, int]) -> Image.Image:
        """The region's text line, rotated horizontal; DB maps shrink text, so the box is grown back."""
        sx, sy = image.width / map_shape[1], image.height / map_shape[0]
        s = (sx + sy) / 2
        height = region["width"] * s * 2.6 + 4
        length = region["length"] * s + region["width"] * s * 1.2 + 4
        cx, cy = region["x"] * sx + sx / 2, region["y"] * sy + sy / 2
        r = int(np.hypot(length, height) / 2) + 2
        box = (int(cx) - r, int(cy) - r, int(cx) + r, int(cy) + r)
        patch = image.crop(box).rotate(region["angle"], resample=Image.BILINEAR)
        c = patch.width / 2
        return patch.crop((int(c - length / 2), int(c - height / 2), int(c + length / 2), int(c + height / 2)))

    def read(self, crops: Sequence[Image.Image]) -> list[tuple[float, int]]:
        """(mean confidence of the decoded characters, number of characters) per crop.

        Crops are batched with others of similar width: padding a short crop to the longest
        one's width costs as much recogniser time as reading real pixels.
        """
        arrays = []
        for im in crops:
            w = int(np.clip(round(48 * im.width / max(1, im.height)), 16, 640))
            arrays.append(np.asarray(im.convert("RGB").resize((w, 48), Image.BILINEAR), dtype=np.float32))
        out: list[tuple[float, int]] = [(0.0, 0)] * len(arrays)
        order = sorted(range(len(arrays)), key=lambda i: arrays[i].shape[1])
        while order:
            group = [i for i in order if arrays[i].shape[1] <= 1.5 * arrays[order[0]].shape[1]]
            order = order[len(group):]
            width = arrays[group[-1]].shape[1]
            batch = np.zeros((len(group), 3, 48, width), dtype=np.float32)
            for row, i in enumerate(group):
                batch[row, :, :, : arrays[i].shape[1]] = (arrays[i][:, :, ::-1] / 127.5 - 1.0).transpose(2, 0, 1)
            probs = self.session.run(None, {self.input_name: batch})[0]
            for row, i in enumerate(group):
                steps = max(1, round(probs.shape[1] * arrays[i].shape[1] / width))
                pr = probs[row, :steps]
                best, conf = pr.argmax(axis=1), pr.max(axis=1)
                keep = (best != 0) & np.concatenate([[True], best[1:] != best[:-1]])
                out[i] = (float(conf[keep].mean()) if keep.any() else 0.0, int(keep.sum()))
        return out

    def features(self, image: Image.Image, text_map: np.ndarray) -> np.ndarray:
        regions = text_regions(text_map)
        crops = [self.crop(image, r, text_map.shape) for r in regions]
        crops_ok = [(r, c) for r, c in zip(regions, crops, strict=True) if c.width >= 4 and c.height >= 4]
        # The map's axis has no direction. A line within 45 degrees of level is read as levelled
        # (marks are not set upside down); a steep one may run either way, so it is read both
        # ways up and the better reading kept.
        steep = [i for i, (r, _) in enumerate(crops_ok) if abs(r["angle"]) > 45]
        both = self.read([c for _, c in crops_ok] + [crops_ok[i][1].rotate(180) for i in steep])
        reads = both[: len(crops_ok)]
        for j, i in enumerate(steep):
            reads[i] = max(reads[i], both[len(crops_ok) + j])
        if not reads:
            return np.zeros(len(READ_FEATURES), dtype=np.float32)
        conf = np.asarray([c for c, _ in reads])
        chars = np.asarray([n for _, n in reads])
        score = conf * (chars >= 2)
        best = int(np.argmax(score))
        textlike = np.asarray([r["textlike"] for r, _ in crops_ok]) > 0
        h, w = text_map.shape
        fx = np.asarray([r["x"] / w for r, _ in crops_ok])
        fy = np.asarray([r["y"] / h for r, _ in crops_ok])
        border = (((fx < 0.35) | (fx > 0.65)) & ((fy < 0.3) | (fy > 0.7))) | (fy > 0.8) | (fy < 0.12)
        centre = (np.abs(fx - 0.5) < 0.25) & (np.abs(fy - 0.5) < 0.25)
        ranked = np.sort(score)[::-1]
        return np.asarray([
            score[best], np.log1p(chars[best]), np.log1p(((conf >= 0.5) & (chars >= 2)).sum()),
            np.log1p(((conf >= 0.8) & (chars >= 2)).sum()), np.log1p(chars[(conf >= 0.8)].sum()),
            float(conf.mean()), float(score[textlike].max()) if textlike.any() else 0.0,
            ranked[1] if len(ranked) > 1 else 0.0, ranked[2] if len(ranked) > 2 else 0.0,
            float(score[border].max()) if border.any() else 0.0, float(score[centre].max()) if centre.any() else 0.0,
        ], dtype=np.float32)


class TextEvidence:
    """Everything the default detector looks at: the text map's summary plus what reads as text."""

    def __init__(self, det_path: Path | str, rec_path: Path | str, long_side: int = 960, threads: int = 0) -> None:
        self.mapper = TextMapFeatures(det_path, long_side=long_side, threads=threads)
        self.reader = TextReader(rec_path, threads=threads)
        self.long_side = long_side

    @classmethod
    def from_settings(cls, settings: Settings | None, long_side: int = 960, threads: int = 0) -> TextEvidence:
        det, rec = find_text_detector(settings), find_text_recogniser(settings)
        if det is None or rec is None:
            missing = OCR_DET_FILE if det is None else OCR_REC_FILE
            raise FileNotFoundError(f"{missing} not found: run `mining models build` "
                                    "(or install rapidocr_onnxruntime, whose wheel ships it)")
        return cls(det, rec, long_side=long_side, threads=threads)

    @property
    def names(self) -> list[str]:
        return self.mapper.names + [f"read.{n}" for n in READ_FEATURES]

    def evidence(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 text map, reading features): the cacheable, expensive part."""
        image = enhance(image)
        text_map = self.mapper.text_map(image)
        return text_map, self.reader.features(image, text_map)

    def combine(self, text_map: np.ndarray, reads: np.ndarray) -> np.ndarray:
        return np.concatenate([self.mapper.map_features(text_map), np.asarray(reads, dtype=np.float32)])

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, len(self.names)), dtype=np.float32)
        return np.stack([self.combine(*self.evidence(im)) for im in images])


# ---------------------------------------------------------------------------- the trained head
@dataclass
class Head:
    """Standardise -> MLP (ReLU hidden layers, one logistic output): plain arrays, numpy forward."""

    mean: np.ndarray
    scale: np.ndarray
    weights: list[np.ndarray]
    biases: list[np.ndarray]

    def logits(self, x: np.ndarray) -> np.ndarray:
        a = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            a = a @ w + b
            if i < len(self.weights) - 1:
                a = np.maximum(a, 0.0)
        return a.reshape(len(a), -1)[:, 0]

    def proba(self, x: np.ndarray) -> np.ndarray:
        return _sigmoid(self.logits(x))

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"mean": self.mean, "scale": self.scale}
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            arrays[f"w{i}"], arrays[f"b{i}"] = w, b
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Any) -> Head:
        n = sum(1 for k in arrays.files if k.startswith("w"))
        return cls(mean=arrays["mean"], scale=arrays["scale"],
                   weights=[arrays[f"w{i}"] for i in range(n)], biases=[arrays[f"b{i}"] for i in range(n)])


def fit_head(x: np.ndarray, y: np.ndarray, seed: int = 0, hidden: tuple[int, ...] = (32,),
             alpha: float = 3.0) -> Head:
    """Fit the head with scikit-learn and export its parameters (MLP, or logistic when hidden=())."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-6] = 1.0
    z = (x - mean) / scale
    if not hidden:
        clf = LogisticRegression(C=1.0 / max(alpha, 1e-6), max_iter=2000, class_weight="balanced")
        clf.fit(z, y)
        return Head(mean, scale, [clf.coef_.T.astype(np.float64)], [clf.intercept_.astype(np.float64)])
    # Strong L2: a lightly regularised MLP saturates at probability 1.0, and ties ruin calibration.
    clf = MLPClassifier(hidden_layer_sizes=hidden, alpha=alpha, max_iter=500, random_state=seed,
                        learning_rate_init=1e-3, n_iter_no_change=20, tol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the iteration cap is a deliberate time budget
        clf.fit(z, y)
    return Head(mean, scale, [w.astype(np.float64) for w in clf.coefs_],
                [b.astype(np.float64) for b in clf.intercepts_])


class TrainedDetector(WatermarkDetector):
    """The default detector: text-map features + a head trained on synthetic watermarks."""

    name = "watermark-default"

    def __init__(self, features: TextEvidence, head: Head, meta: dict[str, Any],
                 threshold: float | None = None) -> None:
        self.extractor = features
        self.head = head
        self.meta = meta
        self.threshold = float(meta["threshold"] if threshold is None else threshold)
        self.version = str(meta["version"])
        self.decode_size = features.long_side

    def predict(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros(0)
        return self.head.proba(self.extractor.features(images))

    def save(self, directory: Path) -> Path:
        return save_head(directory, self.head, self.meta)

    @classmethod
    def load(cls, directory: Path, settings: Settings | None = None, threads: int = 0) -> TrainedDetector:
        meta = json.loads((directory / META_FILE).read_text())
        if meta.get("feature_version") != FEATURE_VERSION:
            raise ValueError(f"{directory}: feature version {meta.get('feature_version')!r} is not "
                             f"{FEATURE_VERSION!r}: retrain with `mining watermark train`")
        with np.load(directory / HEAD_FILE, allow_pickle=False) as arrays:
            head = Head.from_arrays(arrays)
        evidence = TextEvidence.from_settings(settings, long_side=int(meta["long_side"]), threads=threads)
        return cls(evidence, head, meta)


def save_head(directory: Path, head: Head, meta: dict[str, Any]) -> Path:
    """Write head.npz and meta.json atomically (temp dir, then rename over the old one)."""
    buf = io.BytesIO()
    np.savez(buf, **head.to_arrays())
    return replace_dir(directory, {HEAD_FILE: buf.getvalue(), META_FILE: _meta_bytes(meta)})


def _meta_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, indent=2, sort_keys=True, default=_json_default).encode()


def replace_dir(directory: Path, files: dict[str, bytes]) -> Path:
    """Write a model folder in a temp dir beside it, then rename it over the old one.

    Readers see the old model or the new one, never half of each.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}-old-{os.getpid()}-{time.monotonic_ns()}")
        directory.rename(old)
    tmp.rename(directory)
    if old is not None:
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    return directory


def detector_dir(settings: Settings) -> Path:
    return settings.models_dir / "watermark"


def cnn_dir(settings: Settings) -> Path:
    return settings.models_dir / "watermark-cnn"


def load_detector(settings: Settings, threads: int | None = None) -> WatermarkDetector | None:
    """The configured detector, or None when none is available (the scorer then skips the stage).

    ``settings.watermark_model``:

    - ``watermark-default``: the fine-tuned CNN when one is built (`mining watermark finetune`),
      else the text-evidence detector (`mining watermark train`, which `mining init` runs);
    - ``watermark-cnn`` or ``watermark-text``: that one, or None when it is not built;
    - an ``.onnx`` file (or a registry entry that resolves to one): an original-interface classifier.
    """
    threads = settings.intra_op_threads if threads is None else threads
    name = settings.watermark_model
    detector: WatermarkDetector | None = None
    onnx_path = _configured_onnx(settings)
    if onnx_path is not None:
        threshold = settings.watermark_threshold if settings.watermark_threshold is not None else 0.5
        return OnnxClassifierDetector(onnx_path, threshold=threshold, threads=threads)
    if name in ("", "watermark-default", "watermark-cnn"):
        detector = _load_cnn(settings, threads)
    if detector is None and name != "watermark-cnn":
        detector = _load_text(settings, threads)
    if detector is not None and settings.watermark_threshold is not None:
        detector.threshold = settings.watermark_threshold
    return detector


def _load_cnn(settings: Settings, threads: int) -> CnnDetector | None:
    directory = cnn_dir(settings)
    if not (directory / META_FILE).is_file() or not (directory / CnnDetector.model_file).is_file():
        return None
    try:
        return CnnDetector.load(directory, threads=threads)
    except (ValueError, KeyError, OSError) as exc:
        log.warning("watermark CNN in %s unusable: %s", directory, exc)
        return None


def _load_text(settings: Settings, threads: int) -> TrainedDetector | None:
    directory = detector_dir(settings)
    if not (directory / META_FILE).is_file() or not (directory / HEAD_FILE).is_file():
        return None
    try:
        return TrainedDetector.load(directory, settings, threads=threads)
    except (ValueError, KeyError, FileNotFoundError, OSError) as exc:
        log.warning("watermark detector in %s unusable: %s", directory, exc)
        return None


def _configured_onnx(settings: Settings) -> Path | None:
    name = settings.watermark_model
    if name.endswith(".onnx"):
        path = Path(name).expanduser()
        path = path if path.is_absolute() else settings.models_dir / path
        if not path.is_file():
            raise FileNotFoundError(f"MINING_WATERMARK_MODEL: {path} does not exist")
        return path
    if name in ("", "watermark-default", "watermark-cnn", "watermark-text"):
        return None
    try:
        from mining.models import model_path  # type: ignore[attr-defined]

        path = Path(model_path(settings, name))
    except Exception:
        return None
    return path if path.suffix == ".onnx" and path.is_file() else None


# ------------------------------------------------------------------------------ training data
def list_images(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def split_files(files: Sequence[Path], holdout: float, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Deterministic split by file, stratified by folder: (train, held out)."""
    by_dir: dict[Path, list[Path]] = {}
    for f in files:
        by_dir.setdefault(f.parent, []).append(f)
    train_files, held = [], []
    for group in by_dir.values():
        group = sorted(group, key=lambda p: hashlib.sha256(f"{seed}:{p.name}".encode()).hexdigest())
        n_held = round(len(group) * holdout)
        held += group[:n_held]
        train_files += group[n_held:]
    return sorted(train_files), sorted(held)




def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer | np.floating):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _plan(n_pos: int, n_neg: int, rng: np.random.Generator) -> list[tuple[bool, str | None, str | None]]:
    """Balanced kinds x strengths for positives, in a random order; then the clean copies."""
    from mining.synth import KINDS, STRENGTHS

    combos = [(k, s) for k in KINDS for s in STRENGTHS]
    start = int(rng.integers(len(combos)))
    pos = [(True, *combos[(start + i) % len(combos)]) for i in range(n_pos)]
    return pos + [(False, None, None)] * n_neg


def cache_key(digest: str, n_pos: int, n_neg: int, seed: int, long_side: int) -> str:
    """Examples depend on the photo, the recipe and the map resolution, not on the feature summary."""
    return hashlib.sha256(f"{digest}:{n_pos}:{n_neg}:{seed}:{SYNTH_VERSION}:{MAP_VERSION}:{long_side}"
                          .encode()).hexdigest()[:32]


def synth_examples(photo: Path, n_pos: int, n_neg: int, seed: int, digest: str | None = None,
                   ) -> Iterator[tuple[Image.Image, dict[str, Any]]]:
    """One photo's evaluation/training examples, as served images: the same for every detector.

    The random stream is seeded by (seed, photo content), so any detector (the default, an
    ONNX classifier, an experiment) is measured on exactly the same watermarks.
    """
    from mining.synth import make_example

    digest = digest or _file_digest(photo)
    rng = np.random.default_rng([seed, int(digest[:15], 16)])
    base = open_for_detection(photo, 4096)
    for positive, kind, strength in _plan(n_pos, n_neg, rng):
        img, meta = make_example(base, rng, positive, kind=kind, strength=strength)
        meta.update(photo=photo.name, photo_sha256=digest)
        yield img, meta


def example_evidence(extractor: TextEvidence, photo: Path, n_pos: int, n_neg: int, seed: int,
                     cache_dir: Path | None) -> tuple[list[np.ndarray], list[np.ndarray], list[dict[str, Any]]]:
    """Synthesise one photo's examples and run the text detector on them, cached by content and recipe.

    The cache keeps the (small, uint8) text maps, so changing the feature summary or the
    head never re-runs synthesis or the detector.
    """
    digest = _file_digest(photo)
    cached = cache_dir / f"{cache_key(digest, n_pos, n_neg, seed, extractor.long_side)}.npz" \
        if cache_dir is not None else None
    if cached is not None and cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:
                metas = json.loads(str(z["meta"]))
                maps = [z[f"m{i}"] for i in range(len(metas))]
                reads = [z[f"r{i}"] for i in range(len(metas))]
            for m in metas:
                m.update(photo=photo.name, photo_sha256=digest)
            return maps, reads, metas
        except (OSError, ValueError, KeyError):
            log.warning("watermark: ignoring unreadable cache file %s", cached)
    maps, reads, metas = [], [], []
    for img, meta in synth_examples(photo, n_pos, n_neg, seed, digest):
        text_map, read = extractor.evidence(img)
        maps.append(text_map)
        reads.append(read)
        metas.append(meta)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.stem}.{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, meta=np.asarray(json.dumps(metas, default=_json_default)),
                            **{f"m{i}": m for i, m in enumerate(maps)}, **{f"r{i}": r for i, r in enumerate(reads)})
        os.replace(tmp, cached)
    return maps, reads, metas


def build_dataset(extractor: TextEvidence, photos: Sequence[Path], n_pos: int, n_neg: int, seed: int,
                  cache_dir: Path | None, progress: Callable[[int, int], None] | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    xs, metas = [], []
    for i, photo in enumerate(photos):
        try:
            maps, reads, m = example_evidence(extractor, photo, n_pos, n_neg, seed, cache_dir)
            x = np.stack([extractor.combine(t, r) for t, r in zip(maps, reads, strict=True)])
        except Exception as exc:  # one bad file must not sink the training run
            log.warning("watermark: skipping %s: %s", photo, exc)
            continue
        xs.append(x)
        metas += m
        if progress:
            progress(i + 1, len(photos))
    if not xs:
        raise ValueError("no readable images to build watermark examples from")
    x = np.concatenate(xs)
    y = np.asarray([m["label"] for m in metas], dtype=np.int64)
    return x, y, metas


# ------------------------------------------------------------------------------ train / evaluate
@dataclass
class TrainReport:
    version: str
    path: str
    photos: int
    samples: int
    positives: int
    negatives: int
    threshold: float
    cv_auroc: float
    cv_fpr: float
    cv_recall: float
    seconds: float
    held_out_photos: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC, or NaN when only one class is present (nothing to rank)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(set(y.tolist())) == 2 else float("nan")


BOUND_MIN_PHOTOS = 20  # fewer clean photos than this: bounded_threshold adds nothing
MIN_TAIL = 5  # clean examples that must lie above the threshold for an empirical quantile to mean anything


def calibrate_threshold(clean_scores: np.ndarray, target_fpr: float) -> float:
    """Threshold whose false-positive rate on clean images is about ``target_fpr``.

    With enough clean examples it is the empirical quantile: the smallest threshold with at
    most ``target_fpr`` of them at or above it. With few (a first gallery of a handful of
    photos gives a dozen), that quantile is just "above the worst one", and one clean photo
    with text in it would switch the detector off; the tail is then estimated robustly instead
    (median and MAD of the logits, normal quantile), never stricter than the empirical rule.
    """
    s = np.sort(np.asarray(clean_scores, dtype=np.float64))
    if len(s) == 0:
        return 0.5
    allowed = int(np.floor(target_fpr * len(s)))  # how many clean images may score >= threshold
    top = s[len(s) - allowed - 1]  # must be strictly above this one
    empirical = float(min(1.0, np.nextafter(top, np.inf)))
    if target_fpr <= 0 or allowed >= MIN_TAIL or len(s) < 3:
        return empirical
    from scipy.stats import norm

    z = np.log(np.clip(s, 1e-7, 1 - 1e-7) / np.clip(1 - s, 1e-7, 1))
    med = float(np.median(z))
    spread = max(1.4826 * float(np.median(np.abs(z - med))), 0.25)
    robust = float(_sigmoid(np.asarray(med + norm.ppf(1 - target_fpr) * spread)))
    one_above = float(np.nextafter(s[-2], np.inf))  # clean tails are heavy: at most one example above
    return min(empirical, max(robust, one_above))


def threshold_for(clean_scores: np.ndarray, photos: Sequence[str], target_fpr: float, max_fpr: float,
                  confidence: float = FPR_CONFIDENCE, seed: int = 0) -> float:
    """The shipped threshold: the ``target_fpr`` aim on these clean examples, raised where needed
    so that ``max_fpr`` holds in ``confidence`` of photo resamples (:func:`bounded_threshold`)."""
    return max(calibrate_threshold(clean_scores, target_fpr),
               bounded_threshold(clean_scores, photos, max_fpr, confidence, seed=seed))


def train(settings: Settings, clean_dir: Path, out: Path | None = None, n_per_image: int = 8,
          neg_per_image: int = 4, seed: int = 0, holdout: float = 0.0, target_fpr: float = DEFAULT_TARGET_FPR,
          max_fpr: float = DEFAULT_MAX_FPR,
          hidden: tuple[int, ...] = (32,), threads: int | None = None, long_side: int = 960,
          progress: Callable[[int, int], None] | None = None) -> TrainReport:
    """Train the default detector on synthetic watermarks over the clean photos in ``clean_dir``.

    ``holdout`` keeps that fraction of photos (per folder, by name hash) out of training
    entirely, for ``evaluate``. The threshold is calibrated on out-of-fold scores of clean
    images (folds by photo), then the head is refit on all photos.
    """
    from sklearn.model_selection import GroupKFold

    t0 = time.perf_counter()
    files = list_images(clean_dir)
    if not files:
        raise ValueError(f"no images found under {clean_dir}")
    train_files, held = split_files(files, holdout, seed) if holdout > 0 else (files, [])
    threads = settings.intra_op_threads if threads is None else threads
    extractor = TextEvidence.from_settings(settings, long_side=long_side, threads=threads)
    cache = settings.home / "cache" / "watermark"
    x, y, metas = build_dataset(extractor, train_files, n_per_image, neg_per_image, seed, cache, progress)
    groups = np.asarray([m["photo_sha256"] for m in metas])
    n_groups = len(set(groups.tolist()))
    oof = np.full(len(y), np.nan)
    if n_groups >= 2:
        for tr, te in GroupKFold(n_splits=min(5, n_groups)).split(x, y, groups):
            if len(set(y[tr].tolist())) < 2:
                continue
            oof[te] = fit_head(x[tr], y[tr], seed=seed, hidden=hidden).proba(x[te])
    else:  # a single photo: no honest split exists; calibrate in-sample
        oof = fit_head(x, y, seed=seed, hidden=hidden).proba(x)
    clean_ok = (y == 0) & ~np.isnan(oof)
    clean = oof[clean_ok]
    threshold = threshold_for(clean, groups[clean_ok], target_fpr, max_fpr, seed=seed)
    ok = ~np.isnan(oof)
    cv_auroc = auroc(y[ok], oof[ok])
    cv_fpr = float((clean >= threshold).mean()) if len(clean) else float("nan")
    pos = oof[(y == 1) & ok]
    cv_recall = float((pos >= threshold).mean()) if len(pos) else float("nan")
    head = fit_head(x, y, seed=seed, hidden=hidden)
    train_shas = sorted(set(groups.tolist()))
    recipe = f":{seed}:{n_per_image}:{neg_per_image}:{hidden}:{FEATURE_VERSION}:{MAP_VERSION}:{long_side}:{target_fpr}:{max_fpr}"
    version = "wm-" + hashlib.sha256(("".join(train_shas) + recipe).encode()).hexdigest()[:12]
    meta = {
        "name": TrainedDetector.name, "version": version, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                     time.gmtime()),
        "feature_version": FEATURE_VERSION, "synth_version": SYNTH_VERSION, "feature_names": extractor.names,
        "long_side": extractor.long_side, "text_detector": extractor.mapper.model_path.name,
        "text_detector_sha256": _file_digest(extractor.mapper.model_path),
        "text_recogniser": extractor.reader.model_path.name,
        "text_recogniser_sha256": _file_digest(extractor.reader.model_path),
        "head": {"kind": "mlp" if hidden else "logistic", "hidden": list(hidden)},
        "threshold": threshold, "target_fpr": target_fpr, "max_fpr": max_fpr,
        "training": {"clean_dir": str(clean_dir), "photos": len(train_shas), "samples": len(y),
                     "positives": int(y.sum()), "negatives": int((y == 0).sum()), "n_per_image": n_per_image,
                     "neg_per_image": neg_per_image, "seed": seed, "holdout": holdout},
        "metrics": {"cv_auroc": cv_auroc, "cv_fpr": cv_fpr, "cv_recall": cv_recall},
        "train_photos_sha256": train_shas,
    }
    target = out or detector_dir(settings)
    save_head(target, head, meta)
    return TrainReport(version=version, path=str(target), photos=len(train_shas), samples=len(y),
                       positives=int(y.sum()), negatives=int((y == 0).sum()), threshold=threshold,
                       cv_auroc=cv_auroc, cv_fpr=cv_fpr, cv_recall=cv_recall,
                       seconds=round(time.perf_counter() - t0, 1), held_out_photos=[str(p) for p in held])


@dataclass
class EvalReport:
    detector: str
    photos: int
    samples: int
    auroc: float
    threshold: float
    fpr_clean: float
    fpr_by_folder: dict[str, float]
    recall: float
    recall_by_kind: dict[str, float]
    recall_by_strength: dict[str, float]
    recall_by_kind_strength: dict[str, float]
    excluded_training_photos: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        lines = [f"Watermark detector `{self.detector}` on {self.photos} held-out photos "
                 f"({self.samples} examples): AUROC **{self.auroc:.3f}**, threshold {self.threshold:.3f}, "
                 f"false positives on clean images {self.fpr_clean:.1%} "
                 f"({', '.join(f'{k} {v:.1%}' for k, v in self.fpr_by_folder.items())}), recall {self.recall:.1%}.",
                 "", "| kind | faint | strong | all |", "| --- | --- | --- | --- |"]
        for kind, r in self.recall_by_kind.items():
            f = self.recall_by_kind_strength.get(f"{kind}/faint", float("nan"))
            s = self.recall_by_kind_strength.get(f"{kind}/strong", float("nan"))
            lines.append(f"| {kind} | {f:.1%} | {s:.1%} | {r:.1%} |")
        f, s = self.recall_by_strength.get("faint", float("nan")), self.recall_by_strength.get("strong", float("nan"))
        lines.append(f"| all | {f:.1%} | {s:.1%} | {self.recall:.1%} |")
        return "\n".join(lines)


def bounded_threshold(clean_scores: np.ndarray, photos: Sequence[str], max_fpr: float,
                      confidence: float = FPR_CONFIDENCE,
                      draws: int = 400, seed: int = 0) -> float:
    """Lowest threshold whose false-positive rate stays <= ``max_fpr`` in ``confidence`` of photo resamples.

    Clean copies of one photo score alike (a menu stays a menu however it is compressed), so a
    calibration set of 30 photos is 30 observations, not 240, and its empirical quantile is
    noisy: one unlucky split let 7% of held-out scenery through a 3% aim. Resampling whole photos
    (bootstrap) gives how far the rate could be off; the threshold is raised until even the
    pessimistic draw keeps the promise. Under ``BOUND_MIN_PHOTOS`` photos (a first gallery) a
    resample says little beyond "above every photo", which would switch the detector off: no
    bound then (0.0), and :func:`calibrate_threshold`'s tail estimate governs.
    """
    s = np.asarray(clean_scores, dtype=np.float64)
    names, group = np.unique(np.asarray(photos), return_inverse=True)
    if len(s) != len(group):
        raise ValueError(f"{len(s)} scores but {len(group)} photo names")
    if len(names) < BOUND_MIN_PHOTOS:
        return 0.0
    candidates = np.unique(np.append(np.nextafter(s, np.inf), 0.0))  # each clean score, just above
    per_photo_fp = np.stack([len(v) - np.searchsorted(v, candidates) for v in
                             (np.sort(s[group == g]) for g in range(len(names)))], axis=1).astype(np.float64)
    per_photo_n = np.bincount(group).astype(np.float64)  # per_photo_fp: [threshold, photo] clean copies >= it
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(names), size=(draws, len(names)))
    counts = np.stack([np.bincount(row, minlength=len(names)) for row in picks]).astype(np.float64)  # [draw, photo]
    fpr = (per_photo_fp @ counts.T) / (counts @ per_photo_n)  # [threshold, draw]
    ok = np.quantile(fpr, confidence, axis=1) <= max_fpr
    return float(min(1.0, candidates[np.argmax(ok)])) if ok.any() else 1.0


def predict_examples(detector: WatermarkDetector, photos: Sequence[Path], n_pos: int, n_neg: int, seed: int,
                     progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Any detector's probabilities on the synthetic examples, through its own ``predict``."""
    scores: list[np.ndarray] = []
    metas: list[dict[str, Any]] = []
    for i, photo in enumerate(photos):
        try:
            examples = list(synth_examples(photo, n_pos, n_neg, seed))
        except Exception as exc:  # one bad file must not sink the evaluation
            log.warning("watermark: skipping %s: %s", photo, exc)
            continue
        scores.append(np.asarray(detector.predict([img for img, _ in examples]), dtype=np.float64))
        metas += [m for _, m in examples]
        if progress:
            progress(i + 1, len(photos))
    if not metas:
        raise ValueError("no readable images to build watermark examples from")
    return np.concatenate(scores), metas


def evaluate(settings: Settings, clean_dir: Path, detector: WatermarkDetector | None = None, n_per_image: int = 8,
             neg_per_image: int = 4, seed: int = 0, include_training_photos: bool = False,
             progress: Callable[[int, int], None] | None = None) -> EvalReport:
    """Measure the detector on synthetic watermarks over photos it never saw in training.

    Works for any configured detector: the text-evidence default (its training photos are
    skipped, its evidence cached), the fine-tuned CNN (its training and calibration photos are
    skipped) or an ONNX classifier with the original interface (which records no training
    photos, so every photo counts).
    """
    t0 = time.perf_counter()
    if detector is None:
        detector = load_detector(settings)
        if detector is None:
            raise ValueError("no watermark detector: run `mining watermark train --clean DIR` first "
                             "(or set MINING_WATERMARK_MODEL to an ONNX classifier)")
    trained = isinstance(detector, TrainedDetector)
    seen = set(detector.meta.get("train_photos_sha256", [])) if isinstance(detector, TrainedDetector | CnnDetector) \
        else set()
    files = list_images(clean_dir)
    photos = [f for f in files if include_training_photos or _file_digest(f) not in seen]
    excluded = len(files) - len(photos)
    if not photos:
        raise ValueError(f"every image under {clean_dir} was used in training: nothing held out to evaluate on")
    if trained:
        x, y, metas = build_dataset(detector.extractor, photos, n_per_image, neg_per_image, seed,
                                    settings.home / "cache" / "watermark", progress)
        p = detector.head.proba(x)
    else:
        p, metas = predict_examples(detector, photos, n_per_image, neg_per_image, seed, progress)
        y = np.asarray([m["label"] for m in metas], dtype=np.int64)
    thr = detector.threshold
    hit = p >= thr
    folder_of = {f.name: f.parent.name for f in photos}
    fpr_by_folder: dict[str, float] = {}
    for folder in sorted(set(folder_of.values())):
        sel = np.asarray([m["label"] == 0 and folder_of.get(m["photo"]) == folder for m in metas])
        if sel.any():
            fpr_by_folder[folder] = float(hit[sel].mean())

    def recall(pred: Callable[[dict[str, Any]], bool]) -> float:
        sel = np.asarray([m["label"] == 1 and pred(m) for m in metas])
        return float(hit[sel].mean()) if sel.any() else float("nan")

    from mining.synth import KINDS, STRENGTHS

    return EvalReport(
        detector=detector.version, photos=len({m["photo_sha256"] for m in metas}), samples=len(y),
        auroc=auroc(y, p), threshold=thr, fpr_clean=float(hit[y == 0].mean()) if (y == 0).any() else float("nan"),
        fpr_by_folder=fpr_by_folder, recall=recall(lambda m: True),
        recall_by_kind={k: recall(lambda m, k=k: m["kind"] == k) for k in KINDS},
        recall_by_strength={s: recall(lambda m, s=s: m["strength"] == s) for s in STRENGTHS},
        recall_by_kind_strength={f"{k}/{s}": recall(lambda m, k=k, s=s: m["kind"] == k and m["strength"] == s)
                                 for k in KINDS for s in STRENGTHS},
        excluded_training_photos=excluded, seconds=round(time.perf_counter() - t0, 1))
