"""Discovery: steer the watch list toward where good images are, with evidence.

r/all samples all of Reddit; a subreddit seen there whose images were accepted but that is
not watched is proposed for the watch list (and, when the user allows it, promoted within
weekly limits). A watched subreddit that yielded nothing for weeks despite enough
candidates is proposed for removal, never removed automatically: the watch list is the
user's. The watch list lives in the warehouse; the hourly DAGs read it through
:func:`effective_watch_list`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from mining import clock
from mining.lake import atomic_write_bytes
from mining.report import _rows, _table_exists, decided_sql, last_complete_week, week_span
from mining.settings import Settings

log = logging.getLogger(__name__)

SAMPLES = 3

PROPOSALS_DDL = """CREATE TABLE IF NOT EXISTS discovery_proposals (
    week VARCHAR, subreddit VARCHAR, action VARCHAR, evidence VARCHAR, status VARCHAR,
    proposed_at TIMESTAMP, PRIMARY KEY (week, subreddit, action))"""


@dataclass
class Proposal:
    """One suggested change to the watch list and the numbers behind it."""

    week: str
    subreddit: str
    action: str  # add | remove
    status: str  # proposed | promoted
    evidence: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- the watch list the hourly DAGs scrape ---------------------------------------------------


def _cache_path(settings: Settings):  # type: ignore[no-untyped-def]
    return settings.state_dir / "watch_list.json"


def effective_watch_list(settings: Settings) -> tuple[str, ...]:
    """The active watch list from the warehouse (settings.watch_list before it exists).

    Opening DuckDB read-only still takes its file lock; when a writer holds it, the list
    last read (cached under state/) is used instead of failing the scrape.
    """
    if not settings.warehouse_path.exists():
        return settings.watch_list
    try:
        from mining.warehouse import Warehouse

        with Warehouse.open(settings, read_only=True,
                            timeout_s=min(10.0, settings.warehouse_read_timeout_s)) as wh:
            if not _table_exists(wh.con, "watch_list"):
                return settings.watch_list
            total = wh.con.execute("SELECT count(*) FROM watch_list").fetchall()[0][0]
            names = wh.watch_list()
    except Exception as exc:  # a busy or broken warehouse must not stop scraping
        cached = _read_cache(settings)
        log.warning("watch list: warehouse unavailable (%s); using %s", exc,
                    "the cached list" if cached is not None else "settings.watch_list")
        return cached if cached is not None else settings.watch_list
    if total == 0:  # never seeded: the configured list is the user's intent
        return settings.watch_list
    result = tuple(dict.fromkeys(names))
    if _read_cache(settings) != result:
        atomic_write_bytes(json.dumps(list(result)).encode(), _cache_path(settings))
    return result


def _read_cache(settings: Settings) -> tuple[str, ...] | None:
    try:
        return tuple(json.loads(_cache_path(settings).read_text()))
    except (OSError, ValueError):
        return None


# ---- proposals -------------------------------------------------------------------------------


def _watch_rows(con: Any) -> dict[str, dict[str, Any]]:
    if not _table_exists(con, "watch_list"):
        return {}
    rows = _rows(con, "SELECT subreddit, active, epoch(added_at) AS added FROM watch_list")
    return {r["subreddit"].lower(): r for r in rows}


def add_candidates(con: Any, week: str) -> list[dict[str, Any]]:
    """Subreddits seen through r/all this week with accepted images, best first."""
    start, end = week_span(week)
    rows = _rows(con, f"""
        WITH via_all AS (SELECT DISTINCT subreddit FROM posts
                         WHERE lower(source) = 'all' AND created_utc >= ? AND created_utc < ?),
             d AS (SELECT * FROM ({decided_sql(permalinks=True)}) WHERE interval_start >= ? AND interval_start < ?)
        SELECT d.subreddit, count(*) AS candidates, count(*) FILTER (WHERE d.class = 'accepted') AS accepted,
               (SELECT count(DISTINCT post_id) FROM posts p WHERE p.subreddit = d.subreddit
                  AND p.created_utc >= ? AND p.created_utc < ?) AS posts_seen,
               list(DISTINCT d.permalink ORDER BY d.permalink) FILTER (WHERE d.class = 'accepted') AS samples
        FROM d JOIN via_all USING (subreddit)
        GROUP BY d.subreddit HAVING count(*) FILTER (WHERE d.class = 'accepted') > 0""",
                 [start, end, start, end, start, end])
    for r in rows:
        r["candidates"], r["accepted"], r["posts_seen"] = int(r["candidates"]), int(r["accepted"]), int(r["posts_seen"])
        r["acceptance_rate"] = r["accepted"] / r["candidates"]
        r["samples"] = [s for s in (r["samples"] or []) if s][:SAMPLES]
    rows.sort(key=lambda r: (-r["accepted"], -r["acceptance_rate"], r["subreddit"].lower()))
    return rows


def barren_entries(con: Any, settings: Settings, week: str, watch: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Active watch-list entries with no accepted image for N weeks despite enough candidates."""
    _, end = week_span(week)
    since = end - timedelta(weeks=settings.discovery_barren_weeks)
    rows = _rows(con, f"""SELECT lower(subreddit) AS key, min(subreddit) AS subreddit, count(*) AS candidates,
                                 count(*) FILTER (WHERE class = 'accepted') AS accepted
                          FROM ({decided_sql()}) WHERE interval_start >= ? AND interval_start < ? GROUP BY 1""",
                 [since, end])
    stats = {r["key"]: r for r in rows}
    out = []
    for key, w in sorted(watch.items()):
        if not w["active"] or (w["added"] is not None and w["added"] > since.replace(tzinfo=UTC).timestamp()):
            continue  # inactive, or too new to judge
        s = stats.get(key, {"candidates": 0, "accepted": 0})
        if int(s["accepted"]) == 0 and int(s["candidates"]) >= settings.discovery_barren_min_candidates:
            out.append({"subreddit": w["subreddit"], "candidates": int(s["candidates"]), "accepted": 0,
                        "acceptance_rate": 0.0, "weeks": settings.discovery_barren_weeks,
                        "since": since.replace(tzinfo=UTC).isoformat()})
    return out


def propose(settings: Settings, week: str | None = None) -> list[Proposal]:
    """Write this week's proposals (and promotions, if enabled) and return them.

    Idempotent: a rerun replaces the week's open proposals; promotions already made this
    week stay recorded and count against ``discovery_max_per_week``.
    """
    from mining.warehouse import Warehouse

    week = week or last_complete_week()
    now = datetime.fromtimestamp(clock.now(), UTC)
    with Warehouse.open(settings) as wh:
        con = wh.con
        con.execute(PROPOSALS_DDL)
        watch = _watch_rows(con)
        promoted = [Proposal(week, r["subreddit"], r["action"], r["status"], json.loads(r["evidence"]))
                    for r in _rows(con, """SELECT subreddit, action, status, evidence FROM discovery_proposals
                                           WHERE week = ? AND status = 'promoted' ORDER BY subreddit""", [week])]
        done = {p.subreddit.lower() for p in promoted}
        proposals: list[Proposal] = []
        for r in add_candidates(con, week):
            key = r["subreddit"].lower()
            if key in done or (key in watch and watch[key]["active"]):
                continue
            evidence = {k: r[k] for k in ("accepted", "candidates", "acceptance_rate", "posts_seen", "samples")}
            evidence["seen_via"] = "all"
            if key in watch:
                evidence["note"] = "removed from the watch list by the user earlier"
            proposals.append(Proposal(week, r["subreddit"], "add", "proposed", evidence))
        for r in barren_entries(con, settings, week, watch):
            evidence = {k: r[k] for k in ("accepted", "candidates", "acceptance_rate", "weeks", "since")}
            evidence["samples"] = []
            proposals.append(Proposal(week, r["subreddit"], "remove", "proposed", evidence))
        if settings.discovery_auto_promote:
            room = settings.discovery_max_per_week - len(promoted)
            for p in proposals:
                if room <= 0:
                    break
                ev = p.evidence
                if (p.action == "add" and p.subreddit.lower() not in watch  # never re-add what the user removed
                        and ev["accepted"] >= settings.discovery_min_accepted
                        and ev["acceptance_rate"] >= settings.discovery_min_rate):
                    p.status = "promoted"
                    room -= 1
        with wh.transaction():
            con.execute("DELETE FROM discovery_proposals WHERE week = ? AND status <> 'promoted'", [week])
            for p in proposals:
                con.execute("INSERT INTO discovery_proposals VALUES (?, ?, ?, ?, ?, ?)",
                            [week, p.subreddit, p.action, json.dumps(p.evidence), p.status, now])
                if p.status == "promoted":
                    _promote(wh, p)
    result = promoted + proposals
    log.info("discovery %s: %d proposals (%d promoted)", week, len(result),
             sum(p.status == "promoted" for p in result))
    return result


def _promote(wh: Any, p: Proposal) -> None:
    """Add the subreddit to the warehouse watch list (the hourly DAGs pick it up next run)."""
    note = (f"discovery {p.week}: {p.evidence['accepted']} accepted of {p.evidence['candidates']} "
            f"({100 * p.evidence['acceptance_rate']:.0f}%) via r/all")
    wh.add_to_watch_list(p.subreddit, added_by="discovery", note=note)
