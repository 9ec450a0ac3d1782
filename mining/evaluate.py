"""How well does each taste model separate liked images from others, honestly held out?

Outer k-fold over both folders: in each fold the model sees the training part of the liked
images and, as its "unlabelled stream", the training part of the other images (so selection and
calibration run exactly as in production); it is then judged on the held-out liked and other
images it never saw. Reported per model kind: held-out AUROC (mean over folds), recall of held-out
liked images and acceptance of held-out others at the calibrated threshold, and which kind
``fit_and_select`` picks ("auto", with and without a stream).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mining.novelty import KINDS, auroc, fit_and_select
from mining.settings import Settings

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
AUTO = "auto"
AUTO_NO_STREAM = "auto (no stream)"


@dataclass
class ModelRow:
    """One line of the evaluation table."""

    model: str
    auroc: float
    auroc_min: float
    recall: float
    acceptance: float
    pu_auroc: float | None
    chosen: str
    folds: int


@dataclass
class EvaluationReport:
    liked: int
    other: int
    dim: int
    folds: int
    seed: int
    rows: list[ModelRow]
    chosen_on_all: str
    chosen_metrics: dict[str, Any]
    target_recall: float
    target_acceptance: float | None
    embedder: str = ""
    sources: dict[str, str] = field(default_factory=dict)

    def row(self, model: str) -> ModelRow:
        return next(r for r in self.rows if r.model == model)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=float)

    def to_markdown(self) -> str:
        calib = (f"target acceptance {self.target_acceptance:.0%} of the stream" if self.target_acceptance
                 else f"target recall {self.target_recall:.0%}")
        lines = [
            f"Liked {self.liked}, other {self.other}, dim {self.dim}, {self.folds}-fold held out, seed {self.seed}; "
            f"threshold calibrated to {calib}; `fit_and_select` on all data chooses **{self.chosen_on_all}**.",
            "",
            "| model | held-out AUROC (mean / min over folds) | recall of liked @ threshold "
            "| acceptance of other @ threshold | PU-AUROC used for selection | chosen per fold |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            pu = "n/a" if r.pu_auroc is None else f"{r.pu_auroc:.3f}"
            lines.append(f"| {r.model} | {r.auroc:.3f} / {r.auroc_min:.3f} | {r.recall:.1%} | {r.acceptance:.1%} "
                         f"| {pu} | {r.chosen} |")
        return "\n".join(lines)


def _split(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(f) for f in np.array_split(rng.permutation(n), k)]


def evaluate_embeddings(liked: np.ndarray, other: np.ndarray, settings: Settings, seed: int = 0,
                        folds: int = 5, models: tuple[str, ...] | None = None) -> EvaluationReport:
    """Nested, held-out evaluation of every model kind plus the automatic choice.

    ``models`` restricts the rows (names from KINDS, AUTO, AUTO_NO_STREAM); default all.
    """
    liked, other = np.asarray(liked), np.asarray(other)
    if len(liked) < 4 or len(other) < 2:
        raise ValueError(f"need at least 4 liked and 2 other images to evaluate, got {len(liked)} and {len(other)}")
    k = max(2, min(folds, len(liked) - 1, len(other)))
    rng = np.random.default_rng(seed)
    liked_folds, other_folds = _split(len(liked), k, rng), _split(len(other), k, rng)
    names = list(models or (*KINDS, AUTO, AUTO_NO_STREAM))
    unknown = set(names) - {*KINDS, AUTO, AUTO_NO_STREAM}
    if unknown:
        raise ValueError(f"unknown model rows {sorted(unknown)}")
    aucs: dict[str, list[float]] = {m: [] for m in names}
    kept: dict[str, list[int]] = {m: [0, 0] for m in names}  # liked kept, other accepted
    pus: dict[str, list[float]] = {m: [] for m in names}
    chosen: dict[str, Counter[str]] = {m: Counter() for m in names}
    for i in range(k):
        lt, ot = liked_folds[i], other_folds[i]
        ltrain = np.setdiff1d(np.arange(len(liked)), lt)
        otrain = np.setdiff1d(np.arange(len(other)), ot)
        for m in names:
            stream = None if m == AUTO_NO_STREAM else other[otrain]
            kinds = (m,) if m in KINDS else None
            fitted = fit_and_select(liked[ltrain], stream, settings, seed=seed + i, kinds=kinds)
            s_l, s_o = fitted.score(liked[lt]), fitted.score(other[ot])
            aucs[m].append(auroc(s_l, s_o))
            kept[m][0] += int((s_l >= fitted.threshold).sum())
            kept[m][1] += int((s_o >= fitted.threshold).sum())
            pu = fitted.metrics["pu_auroc"].get(fitted.kind)
            if pu is not None:
                pus[m].append(pu)
            chosen[m][fitted.kind] += 1
    rows = [ModelRow(model=m, auroc=float(np.mean(aucs[m])), auroc_min=float(np.min(aucs[m])),
                     recall=kept[m][0] / len(liked), acceptance=kept[m][1] / len(other),
                     pu_auroc=float(np.mean(pus[m])) if pus[m] else None,
                     chosen=", ".join(f"{kind} x{c}" for kind, c in sorted(chosen[m].items())), folds=k)
            for m in names]
    final = fit_and_select(liked, other, settings, seed=seed)
    return EvaluationReport(liked=len(liked), other=len(other), dim=int(liked.shape[1]), folds=k, seed=seed, rows=rows,
                            chosen_on_all=final.kind, chosen_metrics=final.metrics,
                            target_recall=settings.novelty_target_recall,
                            target_acceptance=settings.novelty_target_acceptance)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (sorted, so runs are reproducible)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"not a directory: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def embed_folder(settings: Settings, folder: Path, embedder: Any = None) -> np.ndarray:
    """Embeddings of the readable images in ``folder`` (unreadable ones are logged and skipped)."""
    from mining.embed import load_embedder

    embedder = embedder or load_embedder(settings)
    paths = list_images(folder)
    if not paths:
        raise FileNotFoundError(f"no images in {folder}")
    result = embedder.embed_paths(paths)
    ok = np.asarray(result.ok, dtype=bool)
    for p, good in zip(paths, ok, strict=True):
        if not good:
            log.warning("could not embed %s: skipped", p)
    return np.asarray(result.vectors, dtype=np.float32)[ok]


def evaluate_dirs(settings: Settings, liked_dir: Path, other_dir: Path, seed: int = 0, folds: int = 5,
                  cache: Path | None = None, models: tuple[str, ...] | None = None) -> EvaluationReport:
    """Embed two folders with the configured embedder and evaluate (``cache``: reuse an npz)."""
    liked = other = None
    if cache is not None and cache.exists():
        with np.load(cache, allow_pickle=False) as npz:
            if str(npz["key"]) == _cache_key(settings, liked_dir, other_dir):
                liked, other = npz["liked"], npz["other"]
    if liked is None or other is None:
        from mining.embed import load_embedder

        embedder = load_embedder(settings)
        liked = embed_folder(settings, liked_dir, embedder)
        other = embed_folder(settings, other_dir, embedder)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with open(cache, "wb") as fh:
                np.savez(fh, liked=liked, other=other, key=np.array(_cache_key(settings, liked_dir, other_dir)))
    report = evaluate_embeddings(liked, other, settings, seed=seed, folds=folds, models=models)
    report.embedder = settings.embedder
    report.sources = {"liked": str(liked_dir), "other": str(other_dir)}
    return report


def _cache_key(settings: Settings, liked_dir: Path, other_dir: Path) -> str:
    def sig(folder: Path) -> str:
        return ";".join(f"{p.name}:{p.stat().st_size}" for p in list_images(folder))

    return f"{settings.embedder}|{liked_dir.resolve()}|{sig(liked_dir)}|{other_dir.resolve()}|{sig(other_dir)}"
