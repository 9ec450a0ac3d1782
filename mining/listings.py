"""Incremental listings: the scrape step and the light collector, both feeding hourly partitions.

A post belongs to the hour it was created in, so a run for [start, end) pages each
source's ``/new`` back until it passes ``start`` (or reaches posts an earlier complete
run already stored), keeps only posts created inside the interval and merges them by
post id into what the lake holds: reruns and backfills never lose or duplicate posts.
Listings stop about 1000 deep, so when paging runs out before the boundary the coverage
table says so (``gap``) instead of silently sampling. High-volume sources (r/all) outrun
an hourly fetch; :func:`collect` polls them every few minutes into the same partitions
and records a gap whenever its newest fetch no longer overlaps the previous one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa

from mining import clock, schemas
from mining.lake import Interval, StepResult, atomic_write_bytes, read_partition, write_partition
from mining.reddit import RedditClient, RedditError
from mining.settings import Settings

log = logging.getLogger(__name__)

REDDIT_BASE = "https://www.reddit.com"


# ---- fetching ------------------------------------------------------------------------
@dataclass
class Fetch:
    """What paging one source's listing saw (posts are the raw post dicts)."""

    source: str
    posts: list[dict] = field(default_factory=list)
    pages: int = 0
    requests: int = 0
    stopped: str = ""  # boundary | stored | end | cap | error
    boundary_utc: float | None = None  # created_utc of the post that proved the boundary
    error: str | None = None

    @property
    def oldest(self) -> float | None:
        return min((_created(p) for p in self.posts), default=None)

    @property
    def newest(self) -> float | None:
        return max((_created(p) for p in self.posts), default=None)


def _created(post: dict) -> float:
    return float(post["created_utc"])


def page_back(client: RedditClient, settings: Settings, source: str, max_pages: int,
              is_boundary: Callable[[dict], str | None]) -> Fetch:
    """Page ``/r/<source>/new`` until ``is_boundary`` names a stop reason, the end, or the page cap.

    Errors end the fetch but keep what was read: partial data is still data.
    """
    fetch = Fetch(source)
    before = client.requests_sent
    after: str | None = None
    try:
        while True:
            if fetch.pages >= max_pages:
                fetch.stopped = "cap"
                break
            page = client.listing(source, after=after, limit=settings.listing_page_size)
            fetch.pages += 1
            reason = None
            for post in page["posts"]:
                if not _usable(post):
                    continue
                fetch.posts.append(post)
                if reason is None and (reason := is_boundary(post)):
                    fetch.boundary_utc = _created(post)
            if reason:
                fetch.stopped = reason
                break
            after = page["after"]
            if not after or not page["posts"]:
                # Reddit ends a listing about depth_cap deep; that end is the cap, not the sub's start.
                deep = len(fetch.posts) >= settings.listing_depth_cap - settings.listing_page_size
                fetch.stopped = "cap" if deep else "end"
                break
    except RedditError as exc:
        fetch.stopped, fetch.error = "error", str(exc)
    fetch.requests = client.requests_sent - before
    return fetch


def _usable(post: dict) -> bool:
    try:
        return bool(post.get("id")) and float(post["created_utc"]) > 0
    except (KeyError, TypeError, ValueError):
        return False


# ---- rows ------------------------------------------------------------------------------
def _ts(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


def post_row(post: dict, source: str, fetched_at: datetime) -> dict[str, Any]:
    """One POSTS row from a post dict (already unescaped)."""
    permalink = str(post.get("permalink") or "")
    if permalink.startswith("/"):
        permalink = REDDIT_BASE + permalink
    return {
        "post_id": str(post["id"]),
        "subreddit": post.get("subreddit"),
        "source": source,
        "title": post.get("title"),
        "author": post.get("author"),
        "permalink": permalink or None,
        "url": post.get("url"),
        "domain": post.get("domain"),
        "created_utc": _ts(_created(post)),
        "over_18": bool(post.get("over_18")),
        "is_self": bool(post.get("is_self")),
        "is_video": bool(post.get("is_video")),
        "is_gallery": bool(post.get("is_gallery")),
        "is_crosspost": bool(post.get("crosspost_parent_list") or post.get("crosspost_parent")),
        "removed_by_category": post.get("removed_by_category"),
        "score": int(post.get("score") or 0),
        "num_comments": int(post.get("num_comments") or 0),
        "fetched_at": fetched_at,
        "raw_json": json.dumps(post, ensure_ascii=False, separators=(",", ":")),
    }


def merge_posts(existing: Iterable[dict], new: Iterable[dict]) -> list[dict]:
    """Union by post_id: the first sighting keeps its row (source, fetched_at, raw_json);
    later sightings only refresh score and num_comments. Sorted by post_id."""
    rows = {r["post_id"]: dict(r) for r in existing}
    for r in new:
        old = rows.get(r["post_id"])
        if old is None:
            rows[r["post_id"]] = dict(r)
        else:
            old["score"], old["num_comments"] = r["score"], r["num_comments"]
    return [rows[k] for k in sorted(rows)]


def _coverage_row(fetch: Fetch, hour: Interval, fetched_at: datetime, collector: str, kept: int,
                  reached: bool, gap: bool) -> dict[str, Any]:
    return {
        "source": fetch.source, "interval_start": hour.start, "fetched_at": fetched_at, "collector": collector,
        "pages": fetch.pages, "requests": fetch.requests, "posts_seen": len(fetch.posts), "posts_kept": kept,
        "oldest_seen": _ts(fetch.oldest), "newest_seen": _ts(fetch.newest),
        "reached_boundary": reached, "gap": gap, "error": fetch.error,
    }


# ---- lake I/O ------------------------------------------------------------------------------
@contextlib.contextmanager
def _partition_lock(settings: Settings, hour: Interval) -> Iterator[None]:
    """Serialise read-merge-write of one hour: the collector and the hourly scrape share it."""
    path = settings.state_dir / "locks" / f"posts-{hour.key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _rows(settings: Settings, step: str, hour: Interval, schema: pa.Schema) -> list[dict]:
    table = read_partition(settings.lake_dir, step, hour, schema)
    return [] if table is None else table.to_pylist()


def _store_hour(settings: Settings, hour: Interval, new_posts: list[dict],
                coverage: list[dict]) -> tuple[Path, int, int]:
    """Merge posts and append coverage for one hour; return (posts path, new posts, total posts)."""
    with _partition_lock(settings, hour):
        existing = _rows(settings, "posts", hour, schemas.POSTS)
        known = {r["post_id"] for r in existing}
        merged = merge_posts(existing, new_posts)
        added = len({r["post_id"] for r in new_posts} - known)
        path = write_partition(settings.lake_dir, "posts", hour, pa.Table.from_pylist(merged, schema=schemas.POSTS))
        cov = _rows(settings, "coverage", hour, schemas.COVERAGE) + coverage
        cov.sort(key=lambda r: (r["fetched_at"], r["collector"], r["source"]))
        write_partition(settings.lake_dir, "coverage", hour, pa.Table.from_pylist(cov, schema=schemas.COVERAGE))
    return path, added, len(merged)


def _known_complete_until(settings: Settings, interval: Interval, source: str) -> datetime:
    """How far [start, T) of ``source`` is known complete from earlier hourly runs without gaps."""
    until = interval.start
    for hour in interval.hours():
        if hour.start > until:
            break
        best = None
        for row in _rows(settings, "coverage", hour, schemas.COVERAGE):
            if (row["source"].lower() == source.lower() and row["collector"] == "hourly" and row["reached_boundary"]
                    and not row["gap"] and not row["error"] and row["newest_seen"] is not None):
                best = row["newest_seen"] if best is None else max(best, row["newest_seen"])
        if best is None:
            break
        until = max(until, min(hour.end, best))
        if until < hour.end:
            break
    return until


def _now(now: datetime | None = None) -> datetime:
    moment = now if now is not None else datetime.fromtimestamp(clock.now(), UTC)
    return moment.astimezone(UTC)


# ---- the scrape step ---------------------------------------------------------------------
def scrape_interval(settings: Settings, interval: Interval, client: RedditClient | None = None) -> StepResult:
    """Collect every source's posts created in ``interval`` into its hourly ``posts`` partitions.

    One failing source is recorded in ``coverage.error``; only all sources failing raises.
    """
    client = client or RedditClient(settings)
    fetched_at = _now()
    start_s = interval.start.timestamp()
    hours = interval.hours()
    per_hour_posts: dict[str, dict[str, dict]] = {h.key: {} for h in hours}
    per_hour_cov: dict[str, list[dict]] = {h.key: [] for h in hours}
    counts = {"sources": 0, "sources_failed": 0, "requests": 0, "pages": 0, "posts_seen": 0, "posts_kept": 0,
              "gaps": 0}
    errors: list[str] = []
    for source in settings.all_sources:
        known_until = _known_complete_until(settings, interval, source).timestamp()
        stored: set[str] = set()
        if known_until > start_s:
            for hour in hours:
                stored |= {r["post_id"] for r in _rows(settings, "posts", hour, schemas.POSTS)}

        def boundary(post: dict, known_until: float = known_until, stored: set[str] = stored) -> str | None:
            created = _created(post)
            if created < start_s:
                return "boundary"
            if created < known_until and post["id"] in stored:
                return "stored"
            return None

        fetch = page_back(client, settings, source, settings.listing_max_pages, boundary)
        counts["sources"] += 1
        counts["requests"] += fetch.requests
        counts["pages"] += fetch.pages
        counts["posts_seen"] += len(fetch.posts)
        if fetch.error:
            counts["sources_failed"] += 1
            errors.append(f"{source}: {fetch.error}")
            log.error("scrape %s %s: %s", source, interval, fetch.error)
        # Everything older than this instant was seen (or stored by a complete earlier run).
        proven = {"boundary": fetch.boundary_utc, "stored": start_s - 1e-6, "end": float("-inf")}.get(fetch.stopped)
        for hour in hours:
            h_start, h_end = hour.start.timestamp(), hour.end.timestamp()
            kept = [p for p in fetch.posts if h_start <= _created(p) < h_end]
            for post in kept:
                bucket = per_hour_posts[hour.key]
                row = post_row(post, source, fetched_at)
                if post["id"] in bucket:  # seen through an earlier source this run: keep that source
                    bucket[post["id"]]["score"], bucket[post["id"]]["num_comments"] = row["score"], row["num_comments"]
                else:
                    bucket[post["id"]] = row
            reached = proven is not None and proven < h_start
            gap = fetch.stopped == "cap" and not reached
            counts["gaps"] += int(gap)
            counts["posts_kept"] += len(kept)
            per_hour_cov[hour.key].append(_coverage_row(fetch, hour, fetched_at, "hourly", len(kept), reached, gap))
        log.info("scrape %s %s: %d pages, %d seen, stopped=%s", source, interval, fetch.pages, len(fetch.posts),
                 fetch.stopped)
    paths, new_total, rows_total = [], 0, 0
    for hour in hours:
        path, added, total = _store_hour(settings, hour, list(per_hour_posts[hour.key].values()),
                                         per_hour_cov[hour.key])
        paths.append(path)
        new_total += added
        rows_total += total
    counts.update(posts_new=new_total, posts_total=rows_total, partitions=len(paths))
    if counts["sources"] and counts["sources_failed"] == counts["sources"]:
        raise RedditError(f"every source failed for {interval}: " + "; ".join(errors))
    path = str(paths[0]) if len(paths) == 1 else str(settings.lake_dir / "posts")
    return StepResult("scrape", str(interval), path, counts)


# ---- the light collector -------------------------------------------------------------------
def _collector_state_path(settings: Settings, source: str) -> Path:
    return settings.state_dir / "collector" / f"{source.lower()}.json"


def _load_collector_state(settings: Settings, source: str) -> dict[str, Any] | None:
    try:
        state = json.loads(_collector_state_path(settings, source).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "newest_utc" in state else None


def collect(settings: Settings, now: datetime | None = None, sources: Iterable[str] | None = None,
            client: RedditClient | None = None) -> StepResult:
    """Poll high-volume sources' newest posts into the hourly partitions (a few requests each).

    Consecutive polls must overlap (this poll reaches a post at least as old as the newest
    of the previous one); when they do not, the coverage row says ``gap``.
    """
    client = client or RedditClient(settings)
    fetched_at = _now(now)
    names = tuple(sources) if sources is not None else settings.collector_sources
    counts = {"sources": 0, "sources_failed": 0, "requests": 0, "pages": 0, "posts_seen": 0, "posts_new": 0,
              "gaps": 0, "partitions": 0}
    errors: list[str] = []
    touched: list[Interval] = []
    for source in names:
        state = _load_collector_state(settings, source)
        prev_newest = float(state["newest_utc"]) if state else None

        def overlap(post: dict, prev_newest: float | None = prev_newest) -> str | None:
            return "boundary" if prev_newest is not None and _created(post) <= prev_newest else None

        fetch = page_back(client, settings, source, max(1, settings.collector_pages), overlap)
        counts["sources"] += 1
        counts["requests"] += fetch.requests
        counts["pages"] += fetch.pages
        counts["posts_seen"] += len(fetch.posts)
        if fetch.error:
            counts["sources_failed"] += 1
            errors.append(f"{source}: {fetch.error}")
            log.error("collect %s: %s", source, fetch.error)
        reached = fetch.stopped in ("boundary", "end")
        gap = prev_newest is not None and fetch.stopped == "cap"
        by_hour: dict[Interval, list[dict]] = {}
        for post in fetch.posts:
            by_hour.setdefault(Interval.hour_of(_ts(_created(post))), []).append(post)  # type: ignore[arg-type]
        if not by_hour:
            by_hour[Interval.hour_of(fetched_at)] = []
        for hour, posts in sorted(by_hour.items()):
            rows = [post_row(p, source, fetched_at) for p in posts]
            # The unseen stretch lies between the previous poll and this poll's oldest post: mark it there.
            hour_gap = gap and hour == min(by_hour)
            cov = _coverage_row(fetch, hour, fetched_at, "collector", len(rows), reached, hour_gap)
            _, added, _ = _store_hour(settings, hour, rows, [cov])
            counts["posts_new"] += added
            counts["gaps"] += int(hour_gap)
            if hour not in touched:
                touched.append(hour)
        if fetch.newest is not None and not fetch.error:
            newest = max(fetch.newest, prev_newest or fetch.newest)
            payload = {"newest_utc": newest, "fetched_at": fetched_at.isoformat()}
            atomic_write_bytes(json.dumps(payload).encode(), _collector_state_path(settings, source))
        log.info("collect %s: %d pages, %d seen, stopped=%s, gap=%s", source, fetch.pages, len(fetch.posts),
                 fetch.stopped, gap)
    counts["partitions"] = len(touched)
    if counts["sources"] and counts["sources_failed"] == counts["sources"]:
        raise RedditError("every collector source failed: " + "; ".join(errors))
    span = (f"[{min(touched).start.isoformat()}, {(max(touched).start + timedelta(hours=1)).isoformat()})"
            if touched else "")
    return StepResult("collect", span, str(settings.lake_dir / "posts"), counts)
