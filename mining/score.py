"""The scoring cascade: one final decision, with a reason, for every candidate.

Cheap checks first, so expensive models only see what can still be accepted:
prefilter/download status -> exact sha256 against the gallery -> novelty (taste) ->
watermark (survivors only, unless ``watermark_on_all``) -> perceptual dedupe against the
gallery and within the batch. Every reason names the stage, the score and the threshold,
so "why was this rejected?" is one SQL query.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mining import clock
from mining.lake import Interval, StepResult, read_partition, write_partition
from mining.schemas import SCORES
from mining.settings import Settings

log = logging.getLogger(__name__)


class NoNoveltyModelError(RuntimeError):
    """Scoring needs a taste model; the message says how to make one."""


@dataclass
class Verdict:
    """The cascade's working record for one candidate."""

    row: dict[str, Any]
    decision: str | None = None
    stage: str | None = None
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def decide(self, decision: str, stage: str, reason: str) -> None:
        self.decision, self.stage, self.reason = decision, stage, reason


def prefilter_verdict(status: str) -> tuple[str, str, str] | None:
    """Decision for candidates that never reached the models (skipped or failed before scoring)."""
    if status == "downloaded":
        return None
    kind, _, why = status.partition(":")
    why = why or "unknown"
    if kind == "skipped" and why.startswith("already_downloaded"):
        return "duplicate", "prefilter", f"prefilter: image URL already downloaded in an earlier interval ({why})"
    if kind == "skipped":
        return "rejected", "prefilter", f"prefilter: {why}"
    return "failed", "download", f"download: {why}"


def score_interval(settings: Settings, interval: Interval) -> StepResult:
    """Score every hour of the interval that has candidates; write the ``scores`` partitions."""
    from mining.novelty import load_active

    novelty = load_active(settings)
    if novelty is None:
        raise NoNoveltyModelError(
            f"no active novelty model under {settings.novelty_dir}: run `mining init --liked DIR` first")
    detector = _load_watermark(settings)
    counts: Counter[str] = Counter()
    paths = []
    for hour in interval.hours():
        candidates = read_partition(settings.lake_dir, "candidates", hour)
        if candidates is None:
            counts["hours_without_candidates"] += 1
            continue
        embeddings = read_partition(settings.lake_dir, "embeddings", hour)
        rows = score_candidates(settings, hour, candidates.to_pylist(), embeddings, novelty, detector)
        counts.update(r["decision"] for r in rows)
        counts["candidates"] += len(rows)
        rows.sort(key=lambda r: r["candidate_id"])
        paths.append(str(write_partition(settings.lake_dir, "scores", hour, pa.Table.from_pylist(rows, SCORES))))
    return StepResult("score", str(interval), paths[0] if len(paths) == 1 else (paths and str(Path(paths[0]).parents[1])) or None,
                      dict(counts))


def score_candidates(settings: Settings, hour: Interval, candidates: list[dict[str, Any]],
                     embeddings: pa.Table | None, novelty: Any, detector: Any) -> list[dict[str, Any]]:
    """Run the cascade over one hour's candidates (pure apart from reading image files)."""
    from mining.dedupe import GalleryIndex, dedupe_batch, hash_file

    index = GalleryIndex.load_or_empty(settings)
    own = {c["candidate_id"] for c in candidates}
    gallery_shas = index.sha256s(excluding_origins=own)
    vectors = _vectors_by_sha(embeddings)
    verdicts = [Verdict(c) for c in sorted(candidates, key=lambda c: c["candidate_id"])]

    # 1. Status from resolution and download; 2. exact content already in the gallery or batch.
    first_of_sha: dict[str, str] = {}
    for v in verdicts:
        pre = prefilter_verdict(v.row["status"] or "failed:unknown")
        if pre:
            v.decide(*pre)
            continue
        sha = v.row["sha256"]
        if sha in gallery_shas:
            v.decide("duplicate", "dedupe", "dedupe: identical image (sha256) already in the gallery")
            v.extra["duplicate_of"] = sha
        elif sha in first_of_sha:
            v.decide("duplicate", "dedupe", f"dedupe: identical image (sha256) to candidate {first_of_sha[sha]}")
            v.extra["duplicate_of"] = sha
        elif sha not in vectors:
            v.decide("failed", "embed", "embed: image could not be embedded")
        else:
            first_of_sha[sha] = v.row["candidate_id"]

    # 3. Novelty: does it belong with what the person likes?
    live = [v for v in verdicts if v.decision is None]
    if live:
        scores = np.asarray(novelty.score(np.stack([vectors[v.row["sha256"]] for v in live])), dtype=np.float64)
        for v, s in zip(live, scores, strict=True):
            v.extra.update(novelty_score=float(s), novelty_threshold=float(novelty.threshold))
            if s < novelty.threshold:
                v.decide("rejected", "novelty",
                         f"novelty: score {s:.4f} < threshold {novelty.threshold:.4f} (model {novelty.version})")

    # 4. Watermark on survivors (or on everything downloaded, for reporting).
    if detector is not None:
        targets = [v for v in verdicts if v.row["status"] == "downloaded" and v.row["sha256"] in vectors
                   and (v.decision is None or settings.watermark_on_all)]
        if targets:
            probs = detector.predict_paths([settings.home / v.row["path"] for v in targets])
            threshold = settings.watermark_threshold if settings.watermark_threshold is not None else detector.threshold
            for v, p in zip(targets, probs, strict=True):
                v.extra.update(watermark_prob=float(p), watermark_threshold=float(threshold))
                if v.decision is None and p >= threshold:
                    v.decide("rejected", "watermark",
                             f"watermark: probability {p:.3f} >= threshold {threshold:.3f} ({detector.version})")

    # 5. Perceptual near-duplicates against the gallery and within the batch.
    live = [v for v in verdicts if v.decision is None]
    if live:
        hashes = [hash_file(settings.home / v.row["path"], settings.phash_size) for v in live]
        results = dedupe_batch([(v.row["sha256"], h) for v, h in zip(live, hashes, strict=True)], index,
                               settings.phash_max_distance, excluding_origins=own)
        for v, h, r in zip(live, hashes, results, strict=True):
            v.extra["phash"] = h[0]
            if r.duplicate_of is not None:
                v.extra.update(duplicate_of=r.duplicate_of, hamming=r.distance)
                where = "the gallery" if r.in_gallery else "another candidate of this hour"
                v.decide("duplicate", "dedupe",
                         f"dedupe: perceptual hash within {r.distance} <= {settings.phash_max_distance} bits "
                         f"of {where} ({r.duplicate_of[:12]})")
            else:
                v.decide("accepted", "accepted",
                         f"accepted: novelty {v.extra['novelty_score']:.4f} >= {novelty.threshold:.4f}"
                         + (f", watermark {v.extra['watermark_prob']:.3f} < {v.extra['watermark_threshold']:.3f}"
                            if "watermark_prob" in v.extra else ", watermark not checked (no detector)"))

    now = clock.now()
    from datetime import UTC, datetime

    scored_at = datetime.fromtimestamp(now, UTC)
    return [{
        "candidate_id": v.row["candidate_id"],
        "post_id": v.row["post_id"],
        "sha256": v.row.get("sha256"),
        "novelty_model": novelty.version,
        "novelty_score": v.extra.get("novelty_score"),
        "novelty_threshold": v.extra.get("novelty_threshold"),
        "watermark_model": detector.version if detector is not None and "watermark_prob" in v.extra else None,
        "watermark_prob": v.extra.get("watermark_prob"),
        "watermark_threshold": v.extra.get("watermark_threshold"),
        "phash": v.extra.get("phash"),
        "duplicate_of": v.extra.get("duplicate_of"),
        "hamming": v.extra.get("hamming"),
        "decision": v.decision,
        "stage": v.stage,
        "reason": v.reason,
        "scored_at": scored_at,
        "interval_start": hour.start,
    } for v in verdicts]


def _vectors_by_sha(embeddings: pa.Table | None) -> dict[str, np.ndarray]:
    if embeddings is None or embeddings.num_rows == 0:
        return {}
    shas = embeddings.column("sha256").to_pylist()
    flat = embeddings.column("embedding").combine_chunks()
    values = flat.values.to_numpy(zero_copy_only=False).astype(np.float32)
    dims = embeddings.column("dim").to_pylist()
    out, offset = {}, 0
    for sha, dim in zip(shas, dims, strict=True):
        out[sha] = values[offset: offset + dim]
        offset += dim
    return out


def _load_watermark(settings: Settings) -> Any:
    from mining.watermark import load_detector

    detector = load_detector(settings)
    if detector is None:
        log.warning("no watermark detector trained: watermark stage skipped (run `mining watermark train`)")
    return detector
