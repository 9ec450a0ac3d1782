"""Weekly refit: a taste model that improves as the gallery grows, with evidence first.

The gallery (the liked set plus what was published) trains a candidate model; the liked
images added since the active version, which it never saw, are the held-out set both are
judged on (published images are the model's own picks, so they never grade it). The new
version goes live only when it is at least as good there (:func:`mining.novelty.refit`).
Both versions are recorded in ``model_versions``; the week's stored embeddings are then
rescored with the candidate so the report can say what it would have decided differently.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from mining import clock
from mining.report import _rows, _table_exists, last_complete_week, week_span
from mining.settings import Settings

log = logging.getLogger(__name__)

MIN_NEW_HELDOUT = 5  # fewer liked images added since the active version: hold out a seeded sample instead
_BATCH_ROWS = 8192

REFIT_DDL = """CREATE TABLE IF NOT EXISTS refit_runs (
    week VARCHAR PRIMARY KEY, new_version VARCHAR, active_version VARCHAR, activated BOOLEAN,
    new_metric DOUBLE, active_metric DOUBLE, train_size BIGINT, unlabelled_size BIGINT, heldout_size BIGINT,
    rescored BIGINT, changed BIGINT, accepted_to_rejected BIGINT, rejected_to_accepted BIGINT,
    changes_by_subreddit VARCHAR, note VARCHAR, created_at TIMESTAMP)"""


@dataclass
class RefitResult:
    """What the refit did, on what data, and how the week's decisions would change."""

    week: str
    new_version: str | None = None
    active_version: str | None = None  # the version live before this refit
    activated: bool = False
    new_auroc: float | None = None
    active_auroc: float | None = None
    train_size: int = 0
    unlabelled_size: int = 0
    heldout_size: int = 0
    rescored: int = 0
    changed: int = 0
    accepted_to_rejected: int = 0
    rejected_to_accepted: int = 0
    stored_rescores: int = 0  # rows the live model's rescore added to the warehouse (when activated)
    changes_by_subreddit: dict[str, dict[str, int]] = field(default_factory=dict)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---- reading embeddings without holding two copies ---------------------------------------------


def fetch_matrix(con: Any, sql: str, params: list[Any] | None = None) -> tuple[list[Any], np.ndarray]:
    """(first column values, [n, d] float32) for a query ``SELECT key, embedding, ...``.

    Rows stream in Arrow batches into one preallocated array, so a 300k x 1280 gallery costs
    its float32 size once, not a Python list per row.
    """
    n = con.execute(f"SELECT count(*) FROM ({sql})", params or []).fetchall()[0][0]
    keys: list[Any] = []
    matrix: np.ndarray | None = None
    at = 0
    reader = con.sql(sql, params=params or None).to_arrow_reader(_BATCH_ROWS)
    for batch in reader:
        if batch.num_rows == 0:
            continue
        emb = batch.column(1)
        flat = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        d = len(flat) // batch.num_rows
        if d * batch.num_rows != len(flat):
            raise ValueError("embeddings of different dimensions in one query")
        if matrix is None:
            matrix = np.empty((n, d), dtype=np.float32)
        matrix[at:at + batch.num_rows] = flat.reshape(batch.num_rows, d)
        at += batch.num_rows
        keys.extend(batch.column(0).to_pylist())
    if matrix is None:
        return [], np.empty((0, 0), dtype=np.float32)
    return keys, matrix[:at]


def gallery_matrix(con: Any, embed_model: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(sha256s, embeddings, added_at epoch for liked rows / NaN for published) of the gallery.

    A gallery row without its own embedding borrows the stored one of the same image; the
    lookup touches only those rows, never the whole embeddings table.
    """
    keys, X = fetch_matrix(con, """
        SELECT sha256, embedding FROM gallery WHERE embedding IS NOT NULL AND embed_model = ?
        UNION ALL
        SELECT g.sha256, e.embedding FROM gallery g JOIN embeddings e USING (sha256)
        WHERE g.embedding IS NULL AND e.model = ?
        QUALIFY row_number() OVER (PARTITION BY g.sha256 ORDER BY e.interval_start) = 1""",
        [embed_model, embed_model])  # no ORDER BY: sorting would materialise every vector inside DuckDB too
    liked_at = {r[0]: (np.nan if r[1] is None else float(r[1])) for r in con.execute(
        "SELECT sha256, CASE WHEN source = 'liked' THEN epoch(added_at) END FROM gallery").fetchall()}
    return keys, X, np.array([liked_at.get(k, np.nan) for k in keys], dtype=np.float64)


def _one_per_image(where: str) -> str:
    """Embeddings of the images selected by ``where`` (one row per sha256, first stored)."""
    return f"""SELECT sha256, embedding FROM embeddings WHERE {where}
               QUALIFY row_number() OVER (PARTITION BY sha256 ORDER BY interval_start) = 1 ORDER BY sha256"""


def stream_matrix(con: Any, embed_model: str, since: datetime, end: datetime, cap: int) -> np.ndarray:
    """Embeddings of candidates seen in [since, end), not in the gallery: the unlabelled stream.

    At most ``cap`` images, a deterministic hash-ordered sample chosen by key first, so only
    the chosen vectors are ever materialised.
    """
    _, X = fetch_matrix(con, _one_per_image("""model = ? AND interval_start >= ? AND interval_start < ?
        AND sha256 IN (SELECT sha256 FROM embeddings WHERE model = ? AND interval_start >= ? AND interval_start < ?
                         AND sha256 NOT IN (SELECT sha256 FROM gallery)
                       GROUP BY sha256 ORDER BY hash(sha256), sha256 LIMIT ?)"""),
        [embed_model, since, end, embed_model, since, end, cap])
    return X


def choose_embed_model(con: Any, settings: Settings) -> str | None:
    """The embedder of the active model if the gallery has it, else the gallery's most common one."""
    from mining.novelty import load_active

    rows = con.execute("""SELECT embed_model, count(*) FROM gallery WHERE embed_model IS NOT NULL
                          GROUP BY 1 ORDER BY 2 DESC, 1""").fetchall()
    if not rows:
        return None
    active = load_active(settings)
    if active is not None and any(r[0] == active.embedder for r in rows):
        return active.embedder
    return str(rows[0][0])


def heldout_rows(keys: list[str], liked_at: np.ndarray, active_created: datetime | None,
                 seed: int = 0) -> tuple[np.ndarray, str]:
    """Indices of liked images the comparison is judged on, and how they were chosen.

    The fallback sample is chosen by a seeded hash of each image's sha256, so it does not
    depend on the order the warehouse returns rows in.
    """
    is_liked = ~np.isnan(liked_at)
    if active_created is not None:
        new = np.flatnonzero(is_liked & (liked_at > active_created.timestamp()))
        if len(new) >= MIN_NEW_HELDOUT:
            return new, f"{len(new)} liked images added since the active version"
    liked_idx = np.flatnonzero(is_liked)
    if len(liked_idx) < 3:
        return np.empty(0, dtype=np.int64), "fewer than 3 liked images"
    take = max(1, min(5000, len(liked_idx) // 10))
    salt = str(seed).encode()
    rank = np.array([hashlib.sha256(salt + keys[i].encode()).digest()[:8] for i in liked_idx], dtype="S8")
    chosen = liked_idx[np.argsort(rank, kind="stable")[:take]]
    return np.sort(chosen), f"a seeded sample of {take} liked images"


# ---- rescoring the week --------------------------------------------------------------------------


def week_decisions(con: Any, week: str) -> list[dict[str, Any]]:
    """The pipeline's decision per scored candidate of the week (the ``decisions`` view: one each)."""
    start, end = week_span(week)
    return _rows(con, """
        SELECT d.candidate_id, d.sha256, d.decision, d.stage, d.novelty_model, d.watermark_prob,
               d.watermark_threshold, c.subreddit
        FROM decisions d LEFT JOIN candidates c USING (candidate_id)
        WHERE d.interval_start >= ? AND d.interval_start < ? AND d.sha256 IS NOT NULL
              AND d.decision IN ('accepted', 'rejected')
        ORDER BY d.candidate_id""", [start, end])


def rescore_diff(con: Any, week: str, fitted: Any, embed_model: str) -> dict[str, Any]:
    """How the week's novelty-stage outcomes change under ``fitted`` (watermark kept as stored)."""
    start, end = week_span(week)
    decisions = week_decisions(con, week)
    shas, X = fetch_matrix(con, _one_per_image("model = ? AND interval_start >= ? AND interval_start < ?"),
                           [embed_model, start, end])
    index = {s: i for i, s in enumerate(shas)}
    passes = fitted.score(X) >= fitted.threshold if len(shas) else np.zeros(0, dtype=bool)
    a2r = r2a = rescored = 0
    by_sub: dict[str, Counter[str]] = {}
    for d in decisions:
        i = index.get(d["sha256"])
        if i is None:
            continue
        rescored += 1
        ok = bool(passes[i])
        change = None
        if d["decision"] == "accepted" and not ok:
            change = "accepted_to_rejected"
        elif d["decision"] == "rejected" and d["stage"] == "novelty" and ok:
            wp, wt = d["watermark_prob"], d["watermark_threshold"]
            if not (wp is not None and wt is not None and wp >= wt):
                change = "rejected_to_accepted"
        if change:
            by_sub.setdefault(d["subreddit"] or "?", Counter())[change] += 1
            a2r += change == "accepted_to_rejected"
            r2a += change == "rejected_to_accepted"
    return {"rescored": rescored, "accepted_to_rejected": a2r, "rejected_to_accepted": r2a,
            "changes_by_subreddit": {k: dict(v) for k, v in sorted(by_sub.items())}}


# ---- the step ---------------------------------------------------------------------------------------


def refit(settings: Settings, week: str | None = None, seed: int = 0) -> RefitResult:
    """Fit a candidate on the gallery, activate it only if at least as good, report the changes."""
    from mining import novelty
    from mining.warehouse import Warehouse

    week = week or last_complete_week()
    _, end = week_span(week)
    result = RefitResult(week=week)
    with Warehouse.open(settings) as wh:
        con = wh.con
        con.execute(REFIT_DDL)
        embed_model = choose_embed_model(con, settings) if _table_exists(con, "gallery") else None
        active = novelty.load_active(settings)
        result.active_version = active.version if active else None
        if embed_model is None:
            result.note = "no gallery embeddings yet: run `mining init --liked DIR` first"
        else:
            keys, liked, liked_at = gallery_matrix(con, embed_model)
            since = end - timedelta(weeks=settings.refit_unlabelled_weeks)
            stream = stream_matrix(con, embed_model, since, end, settings.refit_max_unlabelled)
            active_created = datetime.fromisoformat(active.created_at) if active else None
            held, how = heldout_rows(keys, liked_at, active_created, seed)
            result.train_size, result.unlabelled_size, result.heldout_size = len(liked) - len(held), len(stream), len(held)
            if len(held) == 0 or len(liked) - len(held) < 2 or len(stream) == 0:
                result.note = (f"refit skipped: {len(liked)} gallery images, {len(held)} held out ({how}), "
                               f"{len(stream)} unlabelled: need >= 2 to train, >= 1 held out and a stream")
            else:
                fitted = _fit_and_record(settings, wh, result, liked, stream, held, how, embed_model, seed)
                diff = rescore_diff(con, week, fitted, embed_model)
                if result.activated:
                    # keep the live model's scores beside the pipeline's (rescore_changes view)
                    from mining.lake import Interval
                    from mining.warehouse import rescore

                    start, _ = week_span(week)
                    step = rescore(settings, Interval(start.replace(tzinfo=UTC), end.replace(tzinfo=UTC)), fitted)
                    result.stored_rescores = int(step.counts.get("rescored", 0))
                result.rescored = diff["rescored"]
                result.accepted_to_rejected = diff["accepted_to_rejected"]
                result.rejected_to_accepted = diff["rejected_to_accepted"]
                result.changed = result.accepted_to_rejected + result.rejected_to_accepted
                result.changes_by_subreddit = diff["changes_by_subreddit"]
        _record(wh, result)
    log.info("refit %s: %s", week, {k: v for k, v in result.as_dict().items() if k != "changes_by_subreddit"})
    return result


def _fit_and_record(settings: Settings, wh: Any, result: RefitResult, liked: np.ndarray, stream: np.ndarray,
                    held: np.ndarray, how: str, embed_model: str, seed: int) -> Any:
    from mining import novelty

    out = novelty.refit(settings, liked, stream, heldout=held, seed=seed, embedder=embed_model)
    fitted = out.fitted
    fitted.metrics["heldout"] = how
    result.new_version, result.activated = fitted.version, out.activated
    result.new_auroc, result.active_auroc = _finite(out.new_auroc), _finite(out.active_auroc)
    if not out.activated:
        novelty.save(settings, fitted)  # kept on disk so the user can inspect or activate it by hand
    for version, fit in ((fitted.version, fitted),) + (
            ((out.active_version, novelty.load_version(settings, out.active_version)),)
            if out.active_version else ()):
        wh.upsert_model_version(version=version, kind="novelty", params=fit.params, train_size=fit.train_size,
                                metrics=fit.metrics, threshold=fit.threshold)
    if out.activated:
        wh.set_active_model("novelty", fitted.version)
    verdict = "activated" if out.activated else "refused (worse than the active version)"
    result.note = f"held out {how}; candidate {verdict}"
    return fitted


def _finite(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _record(wh: Any, r: RefitResult) -> None:
    """Replace the week's refit row (the report reads it)."""
    now = datetime.fromtimestamp(clock.now(), UTC).replace(tzinfo=None)
    with wh.transaction():
        wh.con.execute("DELETE FROM refit_runs WHERE week = ?", [r.week])
        wh.con.execute("INSERT INTO refit_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
            r.week, r.new_version, r.active_version, r.activated, r.new_auroc, r.active_auroc, r.train_size,
            r.unlabelled_size, r.heldout_size, r.rescored, r.changed, r.accepted_to_rejected,
            r.rejected_to_accepted, json.dumps(r.changes_by_subreddit), r.note, now])
