"""The gallery: bootstrapping it from liked images, and publishing into it exactly once.

Both are warehouse writers (they hold the single-writer lock), so the gallery table, the
publications table and the perceptual-hash index file always change together. The index
file exists so that non-writer steps (scoring) can dedupe without opening DuckDB.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from mining.lake import Interval, StepResult, atomic_write_bytes, read_partition, sha256_file
from mining.settings import Settings

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


@dataclass
class InitResult:
    added: int = 0
    already_present: int = 0
    unreadable: list[str] = field(default_factory=list)
    novelty_version: str | None = None
    novelty_metrics: dict[str, Any] = field(default_factory=dict)
    watermark_trained: bool = False

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def store_image(settings: Settings, source: Path, sha: str, ext: str) -> Path:
    """Copy a file into the content-addressed image store (once); return its path relative to home."""
    rel = Path("images") / sha[:2] / sha[2:4] / f"{sha}.{ext}"
    target = settings.home / rel
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(target)
    return rel


def liked_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"liked folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def init_gallery(settings: Settings, liked: Path, train_watermark: bool = True, refit: bool = True) -> InitResult:
    """Turn a folder of liked images into the gallery; re-running adds new files only."""
    from mining.dedupe import hash_file
    from mining.embed import load_embedder
    from mining.imaging import open_image_safely
    from mining.warehouse import Warehouse

    result = InitResult()
    files = liked_files(liked)
    if not files:
        raise ValueError(f"no images in {liked}")
    embedder = load_embedder(settings)
    with Warehouse.open(settings) as wh:
        known = {row[0] for row in wh.gallery_hashes()}
        fresh: list[tuple[Path, str, str]] = []
        for path in files:
            sha = sha256_file(path)
            if sha in known or any(sha == f[1] for f in fresh):
                result.already_present += 1
                continue
            try:
                with open_image_safely(path.read_bytes(), settings) as img:
                    ext = (img.format or "jpg").lower().replace("jpeg", "jpg")
            except Exception as exc:  # an unreadable liked file is reported, not fatal
                result.unreadable.append(f"{path}: {exc}")
                continue
            fresh.append((path, sha, ext))
        if fresh:
            embedded = embedder.embed_paths([p for p, _, _ in fresh])
            rows = []
            for i, (path, sha, ext) in enumerate(fresh):
                if not embedded.ok[i]:
                    result.unreadable.append(f"{path}: {embedded.errors[i]}")
                    continue
                rel = store_image(settings, path, sha, ext)
                phash, mirror = hash_file(settings.home / rel, settings.phash_size)
                rows.append({"sha256": sha, "path": str(rel), "phash": phash, "phash_mirror": mirror,
                             "embedding": embedded.vectors[i], "embed_model": embedder.model_id,
                             "source": "liked", "added_at": datetime.now(UTC), "post_id": None,
                             "candidate_id": None})
            wh.add_to_gallery(rows)
            result.added = len(rows)
            export_index(settings, wh)
        from mining.novelty import load_active

        if refit and (result.added or load_active(settings) is None):
            fitted = refit_novelty(settings, wh, embedder.model_id)
            result.novelty_version, result.novelty_metrics = fitted.version, fitted.metrics
    if train_watermark:
        from mining.watermark import load_detector, train

        if load_detector(settings) is None:
            log.info("no watermark detector yet: training one on the liked images in %s", liked)
            # A small first gallery gets the full recipe (its clean examples are all the threshold
            # is calibrated on); a large one half of it per photo: minutes, not tens.
            small = len(files) < 40
            train(settings, liked, n_per_image=8 if small else 4, neg_per_image=4 if small else 2)
            result.watermark_trained = True
    return result


def refit_novelty(settings: Settings, wh: Any, embed_model: str) -> Any:
    """Fit, select and calibrate a novelty model on the gallery; activate it atomically."""
    from mining.novelty import activate, fit_and_select, save

    _, liked = wh.gallery_embeddings(embed_model)
    unlabelled = wh.stream_embeddings(embed_model)
    fitted = fit_and_select(liked, unlabelled if len(unlabelled) else None, settings)
    save(settings, fitted)
    activate(settings, fitted.version)
    wh.upsert_model_version(version=fitted.version, kind="novelty", params=fitted.params,
                            train_size=fitted.train_size, metrics=fitted.metrics, threshold=fitted.threshold)
    wh.set_active_model("novelty", fitted.version)
    return fitted


def export_index(settings: Settings, wh: Any) -> Path:
    """Rewrite the gallery's perceptual-hash index file from the gallery table (atomic)."""
    from mining.dedupe import GalleryIndex

    index = GalleryIndex.from_rows(wh.gallery_hashes(), settings.phash_size)
    path = GalleryIndex.path_for(settings)
    index.save(path)
    return path


def publish_interval(settings: Settings, interval: Interval) -> StepResult:
    """Publish the interval's accepted images exactly once per (sha256, target)."""
    from mining.dedupe import GalleryIndex, hash_file
    from mining.publish import PublishItem, make_publisher
    from mining.warehouse import Warehouse

    publisher = make_publisher(settings.replace(publisher="none") if settings.dry_run else settings)
    counts: Counter[str] = Counter()
    with Warehouse.open(settings) as wh:
        index = GalleryIndex.from_rows(wh.gallery_hashes(), settings.phash_size)
        for hour in interval.hours():
            scores = read_partition(settings.lake_dir, "scores", hour)
            if scores is None:
                counts["hours_without_scores"] += 1
                continue
            accepted = [r for r in scores.to_pylist() if r["decision"] == "accepted"]
            if not accepted:
                continue
            candidates = {c["candidate_id"]: c for c in read_partition(settings.lake_dir, "candidates", hour).to_pylist()}
            posts_table = read_partition(settings.lake_dir, "posts", hour)
            posts = {p["post_id"]: p for p in posts_table.to_pylist()} if posts_table is not None else {}
            vectors = _embeddings(settings, hour)
            for row in sorted(accepted, key=lambda r: r["candidate_id"]):
                cand = candidates[row["candidate_id"]]
                sha = row["sha256"]
                done = wh.publication(sha, publisher.target)
                if done is not None and done["status"] == "published":
                    counts["already_published"] += 1
                    if sha not in index and not settings.dry_run:  # recorded by a version that did not join it
                        phash, mirror = hash_file(settings.home / cand["path"], settings.phash_size)
                        wh.add_to_gallery([_gallery_row(cand, row, vectors, phash, mirror)])
                        index.add(sha, phash, mirror, row["candidate_id"])
                        counts["gallery_repaired"] += 1
                    continue
                # Another interval may have published a near-copy since this one was scored.
                phash, mirror = hash_file(settings.home / cand["path"], settings.phash_size)
                match = index.nearest(phash, mirror, exclude_sha=sha)
                if match is not None and match[1] <= settings.phash_max_distance:
                    counts["duplicate_at_publish"] += 1
                    wh.record_publication(sha256=sha, target=publisher.target, status="duplicate",
                                          location=None, error=f"near-duplicate of {match[0]} at publish time",
                                          candidate_id=row["candidate_id"])
                    continue
                post = posts.get(cand["post_id"], {})
                item = PublishItem(
                    sha256=sha, path=settings.home / cand["path"], ext=Path(cand["path"]).suffix.lstrip("."),
                    candidate_id=row["candidate_id"], post_id=cand["post_id"], subreddit=cand["subreddit"],
                    title=post.get("title") or "", author=post.get("author") or "",
                    permalink=post.get("permalink") or "", image_url=cand["url"],
                    scores={"novelty_score": row["novelty_score"], "novelty_threshold": row["novelty_threshold"],
                            "novelty_model": row["novelty_model"], "watermark_prob": row["watermark_prob"]},
                    decision=row["decision"], reason=row["reason"])
                # The publisher is idempotent per sha256 (folder: same file; HTTP: Idempotency-Key), so a
                # crash between its write and this commit re-publishes nothing; the publication record and
                # the gallery row commit together, so no published image is ever missing from the gallery.
                outcome = publisher.publish(item)
                joins = outcome.status == "published" and not settings.dry_run
                with wh.transaction():
                    wh.record_publication(sha256=sha, target=publisher.target, status=outcome.status,
                                          location=outcome.location, error=outcome.error,
                                          candidate_id=row["candidate_id"])
                    if joins:
                        wh.add_to_gallery([_gallery_row(cand, row, vectors, phash, mirror)])
                counts[f"publish_{outcome.status}"] += 1
                if joins:
                    index.add(sha, phash, mirror, row["candidate_id"])
        if not settings.dry_run:
            export_index(settings, wh)  # derived from the table: also heals a file a killed run left stale
    return StepResult("publish", str(interval), str(settings.gallery_path), dict(counts))


def _gallery_row(cand: dict[str, Any], row: dict[str, Any], vectors: dict[str, Any], phash: str,
                 mirror: str) -> dict[str, Any]:
    """The gallery row of a published candidate: its hashes and embedding join the gallery at once."""
    return {"sha256": row["sha256"], "path": cand["path"], "phash": phash, "phash_mirror": mirror,
            "embedding": vectors.get(row["sha256"]), "embed_model": vectors.get("__model__"),
            "source": "published", "added_at": datetime.now(UTC), "post_id": cand["post_id"],
            "candidate_id": row["candidate_id"]}


def _embeddings(settings: Settings, hour: Interval) -> dict[str, Any]:
    table = read_partition(settings.lake_dir, "embeddings", hour)
    if table is None or table.num_rows == 0:
        return {}
    out: dict[str, Any] = {"__model__": table.column("model")[0].as_py()}
    for sha, vec in zip(table.column("sha256").to_pylist(), table.column("embedding").to_pylist(), strict=True):
        out[sha] = np.asarray(vec, dtype=np.float32)
    return out


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write_bytes(text.encode(), path)
