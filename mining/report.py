"""The weekly source report: where this week's good images came from, and at what cost.

People steer scraping by looking, so the report is a self-contained HTML page (inline SVG
charts, the contact sheet as a data URI) with Markdown and JSON beside it, and the same
numbers as DuckDB tables (``report_sources``, ``report_weeks``) for SQL. It reads the
warehouse only; weeks are ISO weeks in UTC. Rerunning a week replaces its files and rows.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from mining import clock
from mining.lake import atomic_write_bytes
from mining.settings import Settings

log = logging.getLogger(__name__)

REASON_CLASSES = ("novelty", "watermark", "duplicate", "failed", "skipped")
CLASS_COLOURS = {
    "accepted": "#2e7d32", "novelty": "#1565c0", "watermark": "#ef6c00", "duplicate": "#6a1b9a",
    "failed": "#c62828", "skipped": "#9e9e9e", "pending": "#cfd8dc",
}
TOP_N = 15

# The class of a candidate's outcome: the warehouse's candidate_decisions view gives every
# candidate one decision (the pipeline's, or one derived from its download status) and a stage.
_CLASS_SQL = """
    CASE
        WHEN decision IS NULL OR decision = 'pending' THEN 'pending'
        WHEN decision = 'accepted' THEN 'accepted'
        WHEN decision = 'duplicate' THEN 'duplicate'
        WHEN decision = 'failed' THEN 'failed'
        WHEN stage = 'novelty' THEN 'novelty'
        WHEN stage = 'watermark' THEN 'watermark'
        WHEN stage = 'dedupe' THEN 'duplicate'
        ELSE 'skipped'
    END
"""

REPORT_DDL = (
    """CREATE TABLE IF NOT EXISTS report_weeks (
        week VARCHAR PRIMARY KEY, week_start TIMESTAMP, week_end TIMESTAMP,
        subreddits INTEGER, posts_seen BIGINT, candidates BIGINT, accepted BIGINT, acceptance_rate DOUBLE,
        rejected_novelty BIGINT, rejected_watermark BIGINT, rejected_duplicate BIGINT, rejected_failed BIGINT,
        rejected_skipped BIGINT, pending BIGINT, requests BIGINT, accepted_per_request DOUBLE,
        prev_accepted BIGINT, coverage_gaps BIGINT, coverage_errors BIGINT, proposals INTEGER,
        html_path VARCHAR, generated_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS report_sources (
        week VARCHAR, subreddit VARCHAR, on_watch_list BOOLEAN, via_all BOOLEAN,
        posts_seen BIGINT, candidates BIGINT, accepted BIGINT, acceptance_rate DOUBLE,
        rejected_novelty BIGINT, rejected_watermark BIGINT, rejected_duplicate BIGINT, rejected_failed BIGINT,
        rejected_skipped BIGINT, pending BIGINT, requests DOUBLE, accepted_per_request DOUBLE,
        prev_accepted BIGINT, accepted_change BIGINT, prev_acceptance_rate DOUBLE, acceptance_rate_change DOUBLE,
        PRIMARY KEY (week, subreddit))""",
)


# ---- ISO weeks ---------------------------------------------------------------------

_WEEK_RE = re.compile(r"^(\d{4})-W(\d{2})$")


def week_bounds(week: str) -> tuple[datetime, datetime]:
    """[Monday 00:00 UTC, next Monday) of an ISO week such as ``2026-W47``."""
    m = _WEEK_RE.match(week.strip())
    if not m:
        raise ValueError(f"not an ISO week (expected e.g. 2026-W47): {week!r}")
    try:
        monday = date.fromisocalendar(int(m.group(1)), int(m.group(2)), 1)
    except ValueError as exc:
        raise ValueError(f"not an ISO week: {week!r}: {exc}") from None
    start = datetime(monday.year, monday.month, monday.day, tzinfo=UTC)
    return start, start + timedelta(days=7)


def week_of(moment: datetime) -> str:
    """The ISO week (UTC) that contains ``moment``."""
    year, wk, _ = moment.astimezone(UTC).isocalendar()
    return f"{year}-W{wk:02d}"


def week_span(week: str) -> tuple[datetime, datetime]:
    """Week bounds as naive UTC datetimes: the warehouse stores naive UTC TIMESTAMPs."""
    start, end = week_bounds(week)
    return start.replace(tzinfo=None), end.replace(tzinfo=None)


def shift_week(week: str, weeks: int) -> str:
    return week_of(week_bounds(week)[0] + timedelta(weeks=weeks))


def last_complete_week(now: datetime | None = None) -> str:
    """The most recent ISO week that has fully ended (the default for reports and refits)."""
    now = now or datetime.fromtimestamp(clock.now(), UTC)
    return shift_week(week_of(now), -1)


# ---- result ---------------------------------------------------------------------------


@dataclass
class ReportResult:
    """Where the report went and its headline numbers (ints travel as step counts)."""

    week: str
    html_path: str
    markdown_path: str
    json_path: str
    contact_sheet_path: str
    subreddits: int = 0
    posts_seen: int = 0
    candidates: int = 0
    accepted: int = 0
    requests: int = 0
    coverage_gaps: int = 0
    proposals: int = 0
    contact_images: int = 0
    data: dict[str, Any] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "data"}
        out["path"] = self.html_path
        return out


# ---- queries --------------------------------------------------------------------------


def _table_exists(con: Any, name: str) -> bool:
    row = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchall()[0]
    return bool(row and row[0])


def _rows(con: Any, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    cur = con.execute(sql, params or [])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def active_watch_list(con: Any) -> set[str]:
    """Lower-cased active watch-list names (empty when the table does not exist)."""
    if not _table_exists(con, "watch_list"):
        return set()
    return {r[0].lower() for r in con.execute("SELECT subreddit FROM watch_list WHERE active").fetchall()}


def decided_sql(permalinks: bool = False) -> str:
    """One row per image candidate: subreddit, post, sha256, decision, reason class, score, interval."""
    if not permalinks:
        return f"""SELECT candidate_id, post_id, subreddit, sha256, NULL AS permalink, decision, stage, reason,
                          novelty_score, interval_start, {_CLASS_SQL} AS class FROM candidate_decisions"""
    return f"""SELECT cd.candidate_id, cd.post_id, cd.subreddit, cd.sha256, p.permalink, cd.decision, cd.stage,
                      cd.reason, cd.novelty_score, cd.interval_start, {_CLASS_SQL} AS class
               FROM candidate_decisions cd
               LEFT JOIN (SELECT post_id, any_value(permalink) AS permalink FROM posts GROUP BY post_id) p
                    USING (post_id)"""


def subreddit_stats(con: Any, week: str) -> dict[str, dict[str, Any]]:
    """Per-subreddit numbers for one week, keyed by subreddit name as stored."""
    start, end = week_span(week)
    stats: dict[str, dict[str, Any]] = {}

    def entry(sub: str) -> dict[str, Any]:
        return stats.setdefault(sub, {
            "subreddit": sub, "posts_seen": 0, "candidates": 0, "accepted": 0, "pending": 0,
            **{f"rejected_{c}": 0 for c in REASON_CLASSES}, "requests": 0.0, "via_all": False,
        })

    for r in _rows(con, """SELECT subreddit, count(DISTINCT post_id) AS n,
                                  bool_or(lower(source) = 'all') AS via_all
                           FROM posts WHERE created_utc >= ? AND created_utc < ? GROUP BY subreddit""",
                   [start, end]):
        e = entry(r["subreddit"])
        e["posts_seen"], e["via_all"] = int(r["n"]), bool(r["via_all"])
    for r in _rows(con, f"""SELECT subreddit, class, count(*) AS n FROM ({decided_sql()})
                            WHERE interval_start >= ? AND interval_start < ? GROUP BY subreddit, class""",
                   [start, end]):
        e = entry(r["subreddit"])
        n = int(r["n"])
        e["candidates"] += n
        if r["class"] in ("accepted", "pending"):
            e[r["class"]] += n
        else:
            e[f"rejected_{r['class']}"] += n
    # API requests are paid per listing source; a shared source (r/all) is attributed to the
    # subreddits it yielded in proportion to their posts.
    for r in _rows(con, """
            WITH req AS (SELECT lower(source) AS source, sum(requests) AS requests FROM coverage
                         WHERE interval_start >= ? AND interval_start < ? GROUP BY 1),
                 seen AS (SELECT lower(source) AS source, subreddit, count(DISTINCT post_id) AS n FROM posts
                          WHERE created_utc >= ? AND created_utc < ? GROUP BY 1, 2)
            SELECT seen.subreddit, sum(req.requests * seen.n / tot.n) AS requests
            FROM seen JOIN req USING (source)
                 JOIN (SELECT source, sum(n) AS n FROM seen GROUP BY 1) tot USING (source)
            GROUP BY seen.subreddit""", [start, end, start, end]):
        entry(r["subreddit"])["requests"] = float(r["requests"] or 0.0)
    for e in stats.values():
        e["acceptance_rate"] = e["accepted"] / e["candidates"] if e["candidates"] else None
        e["accepted_per_request"] = e["accepted"] / e["requests"] if e["requests"] else None
    return stats


def source_stats(con: Any, week: str) -> list[dict[str, Any]]:
    """Per listing source (r/all, each watched subreddit): requests, posts, accepted, gaps."""
    start, end = week_span(week)
    rows = _rows(con, f"""
        WITH cov AS (SELECT lower(source) AS key, min(source) AS source, sum(requests) AS requests,
                            count(*) AS fetches, count(*) FILTER (WHERE gap) AS gaps,
                            count(*) FILTER (WHERE error IS NOT NULL AND error <> '') AS errors
                     FROM coverage WHERE interval_start >= ? AND interval_start < ? GROUP BY 1),
             p AS (SELECT lower(source) AS key, min(source) AS source, count(DISTINCT post_id) AS posts
                   FROM posts WHERE created_utc >= ? AND created_utc < ? GROUP BY 1),
             acc AS (SELECT lower(p.source) AS key, count(*) AS accepted
                     FROM ({decided_sql()}) d JOIN posts p USING (post_id)
                     WHERE d.class = 'accepted' AND d.interval_start >= ? AND d.interval_start < ? GROUP BY 1)
        SELECT coalesce(cov.source, p.source) AS source, coalesce(cov.requests, 0) AS requests,
               coalesce(cov.fetches, 0) AS fetches, coalesce(cov.gaps, 0) AS gaps,
               coalesce(cov.errors, 0) AS errors, coalesce(p.posts, 0) AS posts,
               coalesce(acc.accepted, 0) AS accepted
        FROM cov FULL OUTER JOIN p USING (key) LEFT JOIN acc ON acc.key = coalesce(cov.key, p.key)
        ORDER BY accepted DESC, source""", [start, end, start, end, start, end])
    for r in rows:
        for k in ("requests", "fetches", "gaps", "errors", "posts", "accepted"):
            r[k] = int(r[k])
        r["accepted_per_request"] = r["accepted"] / r["requests"] if r["requests"] else None
    return rows


def coverage_gaps(con: Any, week: str) -> list[dict[str, Any]]:
    """Every fetch that hit the listing cap or failed: posts were missed there."""
    start, end = week_span(week)
    return _rows(con, """
        SELECT source, strftime(interval_start, '%Y-%m-%dT%H:%MZ') AS interval_start,
               collector, requests, posts_seen, posts_kept, gap, coalesce(error, '') AS error
        FROM coverage WHERE interval_start >= ? AND interval_start < ?
              AND (gap OR (error IS NOT NULL AND error <> ''))
        ORDER BY source, interval_start""", [start, end])


def best_accepted(con: Any, week: str, limit: int) -> list[dict[str, Any]]:
    """The week's accepted images, best novelty score first, one per image."""
    start, end = week_span(week)
    return _rows(con, f"""
        SELECT d.sha256, any_value(d.subreddit) AS subreddit, max(d.novelty_score) AS novelty_score,
               any_value(c.path) AS path, any_value(d.permalink) AS permalink
        FROM ({decided_sql(permalinks=True)}) d LEFT JOIN candidates c ON c.sha256 = d.sha256 AND c.path IS NOT NULL
        WHERE d.class = 'accepted' AND d.interval_start >= ? AND d.interval_start < ? AND d.sha256 IS NOT NULL
        GROUP BY d.sha256 ORDER BY novelty_score DESC NULLS LAST, d.sha256 LIMIT ?""", [start, end, limit])


def _optional_rows(con: Any, table: str, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    return _rows(con, sql, params) if _table_exists(con, table) else []


# ---- build ------------------------------------------------------------------------------


def collect_report(con: Any, settings: Settings, week: str) -> dict[str, Any]:
    """Everything the report shows, as plain data (also what report.json holds)."""
    start, end = week_bounds(week)
    prev_week = shift_week(week, -1)
    watch = active_watch_list(con)
    cur, prev = subreddit_stats(con, week), subreddit_stats(con, prev_week)
    subs = []
    for name, e in cur.items():
        p = prev.get(name)
        e["on_watch_list"] = name.lower() in watch
        e["prev_accepted"] = p["accepted"] if p else 0
        e["accepted_change"] = e["accepted"] - e["prev_accepted"]
        e["prev_acceptance_rate"] = p["acceptance_rate"] if p else None
        e["acceptance_rate_change"] = (e["acceptance_rate"] - e["prev_acceptance_rate"]
                                       if e["acceptance_rate"] is not None and e["prev_acceptance_rate"] is not None
                                       else None)
        subs.append(e)
    subs.sort(key=lambda e: (-e["accepted"], -e["candidates"], e["subreddit"].lower()))
    totals: dict[str, Any] = {k: sum(e[k] for e in subs) for k in (
        "posts_seen", "candidates", "accepted", "pending", *(f"rejected_{c}" for c in REASON_CLASSES))}
    sources = source_stats(con, week)
    totals["requests"] = sum(s["requests"] for s in sources)
    totals["subreddits"] = len(subs)
    totals["acceptance_rate"] = totals["accepted"] / totals["candidates"] if totals["candidates"] else None
    totals["accepted_per_request"] = totals["accepted"] / totals["requests"] if totals["requests"] else None
    totals["prev_accepted"] = sum(e["accepted"] for e in prev.values())
    gaps = coverage_gaps(con, week)
    totals["coverage_gaps"] = sum(1 for g in gaps if g["gap"])
    totals["coverage_errors"] = sum(1 for g in gaps if g["error"])
    proposals = _optional_rows(con, "discovery_proposals", """
        SELECT subreddit, action, status, evidence FROM discovery_proposals WHERE week = ?
        ORDER BY action, status DESC, subreddit""", [week])
    for p in proposals:
        p["evidence"] = json.loads(p["evidence"]) if isinstance(p["evidence"], str) else p["evidence"]
    refits = _optional_rows(con, "refit_runs", """
        SELECT week, new_version, active_version, activated, new_metric, active_metric, train_size,
               unlabelled_size, heldout_size, rescored, changed, accepted_to_rejected, rejected_to_accepted,
               note FROM refit_runs WHERE week = ?""", [week])
    return {
        "week": week,
        "week_start": start.isoformat(),
        "week_end": end.isoformat(),
        "previous_week": prev_week,
        "generated_at": datetime.fromtimestamp(clock.now(), UTC).isoformat(timespec="seconds"),
        "totals": totals,
        "subreddits": subs,
        "top_subreddits": [
            {k: e[k] for k in ("subreddit", "accepted", "acceptance_rate", "accepted_per_request", "on_watch_list")}
            for e in subs if e["accepted"] > 0][:TOP_N],
        "sources": sources,
        "coverage_gaps": gaps,
        "proposals": proposals,
        "refit": refits[0] if refits else None,
    }


def build_report(settings: Settings, week: str | None = None) -> ReportResult:
    """Write report.html/.md/.json and contact_sheet.jpg for ``week``, and the report tables."""
    from mining.warehouse import Warehouse

    week = week or last_complete_week()
    week_bounds(week)  # validate before touching anything
    out_dir = settings.reports_dir / week
    with Warehouse.open(settings) as wh:
        con = wh.con
        data = collect_report(con, settings, week)
        best = best_accepted(con, week, settings.report_contact_sheet_size)
        sheet_bytes, placed = contact_sheet(settings, best)
        data["contact_sheet"] = [{k: b[k] for k in ("sha256", "subreddit", "novelty_score", "permalink")}
                                 for b in placed]
        html_path = out_dir / "report.html"
        _write_tables(wh, data, html_path)
    atomic_write_bytes(sheet_bytes, out_dir / "contact_sheet.jpg")
    atomic_write_bytes(render_html(data, sheet_bytes).encode(), html_path)
    atomic_write_bytes(render_markdown(data).encode(), out_dir / "report.md")
    atomic_write_bytes(json.dumps(data, indent=2, default=str).encode(), out_dir / "report.json")
    t = data["totals"]
    log.info("report %s: %d accepted of %d candidates from %d subreddits -> %s",
             week, t["accepted"], t["candidates"], t["subreddits"], html_path)
    return ReportResult(
        week=week, html_path=str(html_path), markdown_path=str(out_dir / "report.md"),
        json_path=str(out_dir / "report.json"), contact_sheet_path=str(out_dir / "contact_sheet.jpg"),
        subreddits=t["subreddits"], posts_seen=t["posts_seen"], candidates=t["candidates"],
        accepted=t["accepted"], requests=int(t["requests"]), coverage_gaps=t["coverage_gaps"],
        proposals=len(data["proposals"]), contact_images=len(placed), data=data)


def _write_tables(wh: Any, data: dict[str, Any], html_path: Path) -> None:
    """Delete-then-insert the week's rows in one transaction (reruns are idempotent)."""
    con = wh.con
    for ddl in REPORT_DDL:
        con.execute(ddl)
    week, t = data["week"], data["totals"]
    start, end = week_span(week)
    with wh.transaction():
        con.execute("DELETE FROM report_weeks WHERE week = ?", [week])
        con.execute("DELETE FROM report_sources WHERE week = ?", [week])
        con.execute("INSERT INTO report_weeks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
            week, start, end, t["subreddits"], t["posts_seen"], t["candidates"], t["accepted"],
            t["acceptance_rate"], *(t[f"rejected_{c}"] for c in REASON_CLASSES), t["pending"], t["requests"],
            t["accepted_per_request"], t["prev_accepted"], t["coverage_gaps"], t["coverage_errors"],
            len(data["proposals"]), str(html_path), datetime.fromisoformat(data["generated_at"]).replace(tzinfo=None)])
        if data["subreddits"]:
            con.executemany(
                "INSERT INTO report_sources VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [[week, e["subreddit"], e["on_watch_list"], e["via_all"], e["posts_seen"], e["candidates"],
                  e["accepted"], e["acceptance_rate"], *(e[f"rejected_{c}"] for c in REASON_CLASSES),
                  e["pending"], e["requests"], e["accepted_per_request"], e["prev_accepted"],
                  e["accepted_change"], e["prev_acceptance_rate"], e["acceptance_rate_change"]]
                 for e in data["subreddits"]])


# ---- contact sheet ------------------------------------------------------------------------

THUMB_W, THUMB_H, LABEL_H, COLS = 240, 180, 22, 6


def contact_sheet(settings: Settings, best: list[dict[str, Any]]) -> tuple[bytes, list[dict[str, Any]]]:
    """A JPEG grid of the best images with subreddit labels; a placeholder when there are none."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    thumbs: list[tuple[Image.Image, dict[str, Any]]] = []
    for b in best:
        path = _image_path(settings, b)
        if path is None:
            continue
        try:
            with Image.open(path) as im:
                im.draft("RGB", (THUMB_W * 2, THUMB_H * 2))
                im = ImageOps.exif_transpose(im).convert("RGB")
                thumbs.append((ImageOps.fit(im, (THUMB_W, THUMB_H), Image.Resampling.LANCZOS), b))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            log.warning("contact sheet: cannot read %s: %s", path, exc)
    font = ImageFont.load_default(size=13)
    if not thumbs:
        sheet = Image.new("RGB", (THUMB_W * 3, THUMB_H), "#eceff1")
        ImageDraw.Draw(sheet).text((16, THUMB_H // 2 - 8), "no accepted images this week", fill="#37474f", font=font)
    else:
        cols = min(COLS, len(thumbs))
        rows = (len(thumbs) + cols - 1) // cols
        sheet = Image.new("RGB", (cols * THUMB_W, rows * (THUMB_H + LABEL_H)), "#ffffff")
        draw = ImageDraw.Draw(sheet)
        for i, (thumb, b) in enumerate(thumbs):
            x, y = (i % cols) * THUMB_W, (i // cols) * (THUMB_H + LABEL_H)
            sheet.paste(thumb, (x, y))
            score = b.get("novelty_score")
            label = f"r/{b['subreddit']}" + (f"  {score:.3f}" if score is not None else "")
            draw.rectangle((x, y + THUMB_H, x + THUMB_W - 1, y + THUMB_H + LABEL_H - 1), fill="#263238")
            draw.text((x + 6, y + THUMB_H + 4), label[:34], fill="#ffffff", font=font)
    buf = io.BytesIO()
    sheet.save(buf, "JPEG", quality=85, optimize=True)
    return buf.getvalue(), [b for _, b in thumbs]


def _image_path(settings: Settings, b: dict[str, Any]) -> Path | None:
    if b.get("path"):
        p = Path(b["path"])
        p = p if p.is_absolute() else settings.home / p
        if p.is_file():
            return p
    sha = b.get("sha256") or ""
    if len(sha) >= 4:
        for p in (settings.images_dir / sha[:2] / sha[2:4]).glob(f"{sha}.*"):
            return p
    return None


# ---- rendering ------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "–"
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.{digits}f}"


def _signed(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.1f} pp" if pct else f"{x:+,d}"


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _svg_open(width: int, height: int, title: str) -> list[str]:
    return [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}"><title>{_esc(title)}</title>']


def hbar_svg(title: str, items: list[tuple[str, float]], colour: str = "#2e7d32",
             fmt: Any = _num, width: int = 560) -> str:
    """Horizontal bars, one per label (labels left, values right)."""
    label_w, value_w, bar_h, gap = 170, 70, 18, 6
    height = max(1, len(items)) * (bar_h + gap) + 10
    top = max((v for _, v in items), default=0) or 1
    out = _svg_open(width, height, title)
    span = width - label_w - value_w
    for i, (label, value) in enumerate(items):
        y = 5 + i * (bar_h + gap)
        w = max(0.0, span * value / top)
        out.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end" class="lbl">{_esc(label)}</text>'
                   f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}"/>'
                   f'<text x="{label_w + w + 4:.1f}" y="{y + 13}" class="val">{_esc(fmt(value))}</text>')
    if not items:
        out.append('<text x="10" y="20" class="val">no data</text>')
    out.append("</svg>")
    return "".join(out)


def stacked_svg(title: str, items: list[tuple[str, dict[str, int]]], classes: tuple[str, ...],
                width: int = 560) -> str:
    """Horizontal stacked bars (share of candidates by outcome) with a legend."""
    label_w, bar_h, gap, legend_h = 170, 18, 6, 24
    height = legend_h + max(1, len(items)) * (bar_h + gap) + 10
    out = _svg_open(width, height, title)
    step = (width - 20) // max(1, len(classes))
    for j, c in enumerate(classes):
        x = 10 + j * step
        out.append(f'<rect x="{x}" y="4" width="12" height="12" fill="{CLASS_COLOURS[c]}"/>'
                   f'<text x="{x + 15}" y="15" class="leg">{_esc(c)}</text>')
    top = max((sum(v.values()) for _, v in items), default=0) or 1
    span = width - label_w - 50
    for i, (label, values) in enumerate(items):
        y = legend_h + 5 + i * (bar_h + gap)
        x = float(label_w)
        out.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end" class="lbl">{_esc(label)}</text>')
        for c in classes:
            w = span * values.get(c, 0) / top
            if w > 0:
                out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{CLASS_COLOURS[c]}">'
                           f'<title>{_esc(label)}: {values.get(c, 0)} {_esc(c)}</title></rect>')
                x += w
        out.append(f'<text x="{x + 4:.1f}" y="{y + 13}" class="val">{sum(values.values())}</text>')
    if not items:
        out.append(f'<text x="10" y="{legend_h + 20}" class="val">no data</text>')
    out.append("</svg>")
    return "".join(out)


def diverging_svg(title: str, items: list[tuple[str, int]], width: int = 560) -> str:
    """Bars left (fewer) or right (more) of a zero line: week-over-week change."""
    label_w, bar_h, gap = 170, 18, 6
    height = max(1, len(items)) * (bar_h + gap) + 10
    top = max((abs(v) for _, v in items), default=0) or 1
    half = (width - label_w - 40) / 2
    zero = label_w + 20 + half
    out = _svg_open(width, height, title)
    out.append(f'<line x1="{zero:.1f}" y1="0" x2="{zero:.1f}" y2="{height}" stroke="#546e7a"/>')
    for i, (label, value) in enumerate(items):
        y = 5 + i * (bar_h + gap)
        w = half * abs(value) / top
        x = zero if value >= 0 else zero - w
        colour = "#2e7d32" if value >= 0 else "#c62828"
        tx = zero + w + 4 if value >= 0 else zero - w - 4
        anchor = "start" if value >= 0 else "end"
        out.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end" class="lbl">{_esc(label)}</text>'
                   f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}"/>'
                   f'<text x="{tx:.1f}" y="{y + 13}" text-anchor="{anchor}" class="val">{value:+d}</text>')
    if not items:
        out.append('<text x="10" y="20" class="val">no data</text>')
    out.append("</svg>")
    return "".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px auto;max-width:1220px;
color:#263238;background:#fafafa}
h1{margin-bottom:4px}h2{margin-top:32px;border-bottom:1px solid #cfd8dc;padding-bottom:4px}
.kpis{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.kpi{background:#fff;border:1px solid #cfd8dc;border-radius:8px;padding:10px 16px;min-width:120px}
.kpi b{display:block;font-size:22px}.kpi span{font-size:12px;color:#607d8b}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(580px,1fr));gap:16px}
figure{background:#fff;border:1px solid #cfd8dc;border-radius:8px;margin:0;padding:10px}
figcaption{font-weight:600;margin-bottom:6px}
svg.chart text.lbl,svg.chart text.val{font-size:12px;fill:#263238}svg.chart text.leg{font-size:11px;fill:#263238}
table{border-collapse:collapse;background:#fff;font-size:13px;width:100%}
th,td{border:1px solid #cfd8dc;padding:4px 8px;text-align:right;white-space:nowrap}th{background:#eceff1}
.scroll{overflow-x:auto}
td:first-child,th:first-child{text-align:left}
img.sheet{max-width:100%;border:1px solid #cfd8dc;border-radius:8px}
.muted{color:#607d8b}
"""


def _table_html(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _link(url: str | None, text: str) -> str:
    if not url or not str(url).startswith(("http://", "https://")):
        return _esc(text)
    return f'<a href="{_esc(url)}">{_esc(text)}</a>'


def render_html(data: dict[str, Any], sheet_jpeg: bytes) -> str:
    """A single self-contained page: inline CSS, inline SVG charts, the contact sheet as a data URI."""
    t, subs = data["totals"], data["subreddits"]
    top = subs[:TOP_N]
    kpis = [("accepted", _num(t["accepted"])), ("image candidates", _num(t["candidates"])),
            ("acceptance rate", _pct(t["acceptance_rate"])), ("posts seen", _num(t["posts_seen"])),
            ("API requests", _num(t["requests"])), ("accepted / request", _num(t["accepted_per_request"], 3)),
            ("vs previous week", _signed(t["accepted"] - t["prev_accepted"])),
            ("coverage gaps", _num(t["coverage_gaps"]))]
    charts = [
        ("Accepted images by subreddit", hbar_svg("accepted by subreddit",
                                                  [(f"r/{e['subreddit']}", e["accepted"]) for e in top])),
        ("Outcomes of image candidates", stacked_svg(
            "outcomes by subreddit",
            [(f"r/{e['subreddit']}", {"accepted": e["accepted"], **{c: e[f"rejected_{c}"] for c in REASON_CLASSES},
                                      "pending": e["pending"]}) for e in top],
            ("accepted", *REASON_CLASSES, "pending"))),
        ("Acceptance rate", hbar_svg("acceptance rate by subreddit",
                                     [(f"r/{e['subreddit']}", e["acceptance_rate"] or 0.0) for e in top
                                      if e["candidates"]], colour="#1565c0", fmt=_pct)),
        (f"Accepted: change vs {data['previous_week']}", diverging_svg(
            "week-over-week change", [(f"r/{e['subreddit']}", e["accepted_change"]) for e in top])),
    ]
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>mining report {_esc(data['week'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>Sources of the week {_esc(data['week'])}</h1>",
        f"<p class=\"muted\">{_esc(data['week_start'])} to {_esc(data['week_end'])} (UTC) · "
        f"generated {_esc(data['generated_at'])}</p>",
        "<div class=\"kpis\">" + "".join(f"<div class=\"kpi\"><b>{_esc(v)}</b><span>{_esc(k)}</span></div>"
                                        for k, v in kpis) + "</div>",
        "<div class=\"grid\">" + "".join(f"<figure><figcaption>{_esc(c)}</figcaption>{svg}</figure>"
                                        for c, svg in charts) + "</div>",
        "<h2>Best accepted images</h2>",
        f"<img class=\"sheet\" id=\"contact-sheet\" alt=\"contact sheet of the week's best accepted images\" "
        f"src=\"data:image/jpeg;base64,{base64.b64encode(sheet_jpeg).decode()}\">",
        "<h2>Subreddits</h2>",
        _table_html(
            ["subreddit", "watched", "posts", "candidates", "accepted", "rate", *REASON_CLASSES, "requests",
             "accepted/request", "Δ accepted", "Δ rate"],
            [[_link(f"https://www.reddit.com/r/{e['subreddit']}", f"r/{e['subreddit']}"),
              "yes" if e["on_watch_list"] else ("via r/all" if e["via_all"] else "no"), _num(e["posts_seen"]),
              _num(e["candidates"]), _num(e["accepted"]), _pct(e["acceptance_rate"]),
              *(_num(e[f"rejected_{c}"]) for c in REASON_CLASSES), _num(e["requests"], 1),
              _num(e["accepted_per_request"], 3), _signed(e["accepted_change"]),
              _signed(e["acceptance_rate_change"], pct=True)] for e in subs]),
        "<h2>Listing sources</h2>",
        _table_html(["source", "requests", "fetches", "posts", "accepted", "accepted/request", "gaps", "errors"],
                    [[_esc(s["source"]), _num(s["requests"]), _num(s["fetches"]), _num(s["posts"]),
                      _num(s["accepted"]), _num(s["accepted_per_request"], 3), _num(s["gaps"]), _num(s["errors"])]
                     for s in data["sources"]]),
        "<h2>Coverage gaps</h2>",
        (_table_html(["source", "interval", "collector", "requests", "seen", "kept", "gap", "error"],
                     [[_esc(g["source"]), _esc(g["interval_start"]), _esc(g["collector"]), _num(g["requests"]),
                       _num(g["posts_seen"]), _num(g["posts_kept"]), "yes" if g["gap"] else "", _esc(g["error"])]
                      for g in data["coverage_gaps"]])
         if data["coverage_gaps"] else "<p>No gaps: every fetch reached posts already stored.</p>"),
        "<h2>Discovery</h2>",
        (_table_html(["subreddit", "action", "status", "accepted", "candidates", "rate", "samples"],
                     [[_esc(f"r/{p['subreddit']}"), _esc(p["action"]), _esc(p["status"]),
                       _num(p["evidence"].get("accepted")), _num(p["evidence"].get("candidates")),
                       _pct(p["evidence"].get("acceptance_rate")),
                       " ".join(_link(u, str(i + 1)) for i, u in enumerate(p["evidence"].get("samples", [])))]
                      for p in data["proposals"]])
         if data["proposals"] else "<p>No proposals this week.</p>"),
        "<h2>Taste model refit</h2>",
        _refit_html(data.get("refit")),
        "</body></html>",
    ]
    return "\n".join(parts)


def _refit_summary(r: dict[str, Any] | None) -> str:
    if not r:
        return "No refit recorded for this week."
    if not r["new_version"]:
        return f"No candidate model this week: {r['note']}"
    verdict = "activated" if r["activated"] else "kept the active model"
    def auc(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    return (f"Candidate {r['new_version']} vs active {r['active_version'] or 'none'}: held-out AUROC "
            f"{auc(r['new_metric'])} vs {auc(r['active_metric'])}; {verdict}. Rescoring {r['rescored']} stored images: {r['changed']} decisions change "
            f"({r['accepted_to_rejected']} accepted→rejected, {r['rejected_to_accepted']} rejected→accepted)."
            + (f" {r['note']}" if r.get("note") else ""))


def _refit_html(r: dict[str, Any] | None) -> str:
    return f"<p>{_esc(_refit_summary(r))}</p>"


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(data: dict[str, Any]) -> str:
    """The same report as Markdown (for chat, e-mail, or a README)."""
    t = data["totals"]
    out = [
        f"# Sources of the week {data['week']}", "",
        f"{data['week_start']} to {data['week_end']} (UTC). Accepted {t['accepted']} of {t['candidates']} image "
        f"candidates ({_pct(t['acceptance_rate'])}) from {t['posts_seen']} posts and {t['requests']} API requests "
        f"({_num(t['accepted_per_request'], 3)} accepted per request); {_signed(t['accepted'] - t['prev_accepted'])} "
        f"vs {data['previous_week']}. Coverage gaps: {t['coverage_gaps']}.", "",
        "## Top subreddits by accepted images", "",
        _md_table(["subreddit", "accepted", "rate", "accepted/request", "watched"],
                  [[f"r/{e['subreddit']}", e["accepted"], _pct(e["acceptance_rate"]),
                    _num(e["accepted_per_request"], 3), "yes" if e["on_watch_list"] else "no"]
                   for e in data["top_subreddits"]]), "",
        "## All subreddits", "",
        _md_table(["subreddit", "posts", "candidates", "accepted", "rate", *REASON_CLASSES, "requests",
                   "Δ accepted"],
                  [[f"r/{e['subreddit']}", e["posts_seen"], e["candidates"], e["accepted"], _pct(e["acceptance_rate"]),
                    *(e[f"rejected_{c}"] for c in REASON_CLASSES), _num(e["requests"], 1),
                    _signed(e["accepted_change"])] for e in data["subreddits"]]), "",
        "## Listing sources", "",
        _md_table(["source", "requests", "posts", "accepted", "accepted/request", "gaps", "errors"],
                  [[s["source"], s["requests"], s["posts"], s["accepted"], _num(s["accepted_per_request"], 3),
                    s["gaps"], s["errors"]] for s in data["sources"]]), "",
        "## Coverage gaps", "",
        (_md_table(["source", "interval", "collector", "requests", "gap", "error"],
                   [[g["source"], g["interval_start"], g["collector"], g["requests"], "yes" if g["gap"] else "",
                     g["error"]] for g in data["coverage_gaps"]]) if data["coverage_gaps"] else "None."), "",
        "## Discovery", "",
        (_md_table(["subreddit", "action", "status", "accepted", "rate", "samples"],
                   [[f"r/{p['subreddit']}", p["action"], p["status"], p["evidence"].get("accepted"),
                     _pct(p["evidence"].get("acceptance_rate")), " ".join(p["evidence"].get("samples", []))]
                    for p in data["proposals"]]) if data["proposals"] else "No proposals."), "",
        "## Taste model refit", "", _refit_summary(data.get("refit")), "",
        "![contact sheet](contact_sheet.jpg)", "",
    ]
    return "\n".join(out)
