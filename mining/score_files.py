"""Score image files outside the pipeline: the first thing a user tries (`mining score PATH...`).

Same models and thresholds as the cascade, so a user can check "would mining keep this?"
on their own files. An unreadable file yields a line with an ``error``, never a crash.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mining.gallery import IMAGE_SUFFIXES
from mining.lake import sha256_file
from mining.settings import Settings


def expand(paths: Iterable[Path]) -> list[Path]:
    """Files as given, folders expanded to the images inside them (sorted)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out


def score_files(settings: Settings, paths: Iterable[Path], batch: int = 32) -> Iterator[dict[str, Any]]:
    """Yield one result dict per image, in input order, batch by batch."""
    from mining.embed import load_embedder
    from mining.novelty import load_active
    from mining.watermark import load_detector

    embedder = load_embedder(settings)
    detector = load_detector(settings)
    novelty = load_active(settings)
    files = expand(paths)
    for i in range(0, len(files), batch):
        chunk = files[i: i + batch]
        embedded = embedder.embed_paths(chunk)
        good = [j for j in range(len(chunk)) if embedded.ok[j]]
        probs = detector.predict_paths([chunk[j] for j in good]) if detector is not None and good else []
        wm = dict(zip(good, probs, strict=False))
        nov = dict(zip(good, novelty.score(embedded.vectors[good]), strict=True)) if novelty is not None and good else {}
        for j, path in enumerate(chunk):
            if not embedded.ok[j]:
                yield {"path": str(path), "error": str(embedded.errors[j])}
                continue
            line: dict[str, Any] = {"path": str(path), "sha256": sha256_file(path),
                                    "embedding_model": embedder.model_id,
                                    "watermark_prob": round(float(wm[j]), 4) if j in wm else None}
            if novelty is not None:
                score = float(nov[j])
                line.update(novelty_score=round(score, 5), novelty_threshold=round(float(novelty.threshold), 5),
                            novelty_model=novelty.version)
                wm_threshold = (settings.watermark_threshold if settings.watermark_threshold is not None
                                else getattr(detector, "threshold", None))
                if score < novelty.threshold:
                    line.update(decision="rejected", reason="novelty")
                elif j in wm and wm_threshold is not None and wm[j] >= wm_threshold:
                    line.update(decision="rejected", reason="watermark")
                else:
                    line.update(decision="accepted", reason="novelty and watermark passed")
            yield line
