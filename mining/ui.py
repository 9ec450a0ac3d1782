"""The Mining page: what the pipeline accepted and rejected, served inside Airflow's UI.

People who run the DAGs look at the Airflow UI, not at SQL, so this module turns the
warehouse into one self-contained HTML page (no scripts, no CDN). It holds the data
access and rendering only; the Airflow plugin in ``plugins/`` mounts it as a web app.

The warehouse is opened read-only per request and only briefly. DuckDB refuses a second
process while the writer (the load/publish steps) holds the file, so a busy warehouse is
retried a few times and then shown as "warehouse busy, retry" instead of an error page.
Thumbnails are served only for sha256-named files from the content-addressed image store,
so a request can never name another path.
"""

from __future__ import annotations

import html
import io
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from mining import clock
from mining.settings import Settings

log = logging.getLogger(__name__)

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
WEEK_RE = re.compile(r"^\d{4}-W\d{2}$")
FILTERS = ("stage", "subreddit", "decision")
MAX_LIMIT = 500
THUMB_SIDE = 320
BUSY_RETRIES = 3
BUSY_WAIT_S = 0.3
REDDIT = "https://www.reddit.com"


@dataclass(frozen=True)
class Filters:
    """The rejection table's filters, from the page's query string."""

    stage: str = ""
    subreddit: str = ""
    decision: str = ""
    limit: int = 50

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> Filters:
        """Unknown keys are ignored and bad limits clamped: a URL typo must not break the page."""
        values = {name: str(query.get(name) or "").strip()[:100] for name in FILTERS}
        try:
            limit = int(query.get("limit") or 50)
        except ValueError:
            limit = 50
        return cls(limit=max(1, min(MAX_LIMIT, limit)), **values)

    def query_string(self, **changes: str) -> str:
        values = {name: getattr(self, name) for name in FILTERS} | changes
        return urlencode({k: v for k, v in values.items() if v})


@dataclass
class MiningPage:
    """Everything the page shows; ``status`` is 'ok', 'empty' (no warehouse yet) or 'busy'."""

    filters: Filters
    status: str = "ok"
    message: str = ""
    accepted: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    facets: dict[str, list[str]] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    report_week: str | None = None


# ---- data ----------------------------------------------------------------------------------
ACCEPTED_SQL = """
SELECT post_id, subreddit, title, permalink, image_url, sha256, novelty_score, novelty_threshold,
       watermark_prob, model_version, interval_start, published_to
FROM mined_images
WHERE decision = 'accepted' AND sha256 IS NOT NULL AND ($subreddit = '' OR subreddit = $subreddit)
ORDER BY interval_start DESC, post_id
LIMIT $limit
"""

REJECTIONS_SQL = """
SELECT cd.post_id, cd.subreddit, p.title, p.permalink, cd.url AS image_url, cd.sha256, cd.decision,
       cd.stage, cd.reason, cd.novelty_score, cd.novelty_threshold, cd.watermark_prob, cd.interval_start
FROM candidate_decisions cd
LEFT JOIN (SELECT post_id, any_value(title) AS title, any_value(permalink) AS permalink
           FROM posts GROUP BY post_id) p ON p.post_id = cd.post_id
WHERE cd.decision <> 'accepted'
  AND ($stage = '' OR cd.stage = $stage)
  AND ($subreddit = '' OR cd.subreddit = $subreddit)
  AND ($decision = '' OR cd.decision = $decision)
ORDER BY cd.interval_start DESC, cd.candidate_id
LIMIT $limit
"""


def load_page(settings: Settings, filters: Filters) -> MiningPage:
    """Read the page's data read-only; a busy warehouse becomes a 'busy' page, never an exception."""
    page = MiningPage(filters=filters, report_week=latest_report_week(settings))
    if not settings.warehouse_path.exists():
        page.status, page.message = "empty", "No warehouse yet: nothing has been mined. Run mining_hourly first."
        return page
    last: Exception | None = None
    for attempt in range(BUSY_RETRIES):
        try:
            _fill(settings, page)
            return page
        except Exception as exc:  # lock timeouts from our flock, or DuckDB's own "Could not set lock"
            if not _is_busy(exc):
                raise
            last = exc
            if attempt + 1 < BUSY_RETRIES:
                clock.sleep(BUSY_WAIT_S)
    log.info("mining view: warehouse busy: %s", last)
    page.status, page.message = "busy", "The warehouse is busy (a load or publish step is writing); retry shortly."
    return page


def _is_busy(exc: Exception) -> bool:
    from mining.warehouse import WarehouseLockTimeout

    return isinstance(exc, WarehouseLockTimeout) or "lock" in str(exc).lower()


def _fill(settings: Settings, page: MiningPage) -> None:
    from mining.warehouse import Warehouse

    f = page.filters
    with Warehouse.open(settings, read_only=True, timeout_s=1.0) as wh:
        page.accepted = wh.rows(ACCEPTED_SQL, {"subreddit": f.subreddit, "limit": min(f.limit, 60)})
        page.rejections = wh.rows(REJECTIONS_SQL, {"stage": f.stage, "subreddit": f.subreddit,
                                                   "decision": f.decision, "limit": f.limit})
        page.totals = dict(wh.query("SELECT decision, count(*) FROM candidate_decisions GROUP BY ALL ORDER BY 1")[1])
        for name in FILTERS:
            page.facets[name] = [r[0] for r in wh.query(
                f"SELECT DISTINCT {name} FROM candidate_decisions WHERE {name} IS NOT NULL "
                f"AND decision <> 'accepted' ORDER BY 1")[1]]
        page.models = wh.rows("SELECT kind, version, threshold, train_size, metrics, params, created_at, "
                              "activated_at FROM active_models ORDER BY kind")
        page.runs = wh.rows("SELECT dag_id, step, interval_start, status, finished_at, counts FROM runs "
                            "ORDER BY finished_at DESC NULLS LAST LIMIT 12")


def latest_report_week(settings: Settings) -> str | None:
    """The newest ISO week with a written report.html (weeks sort as text)."""
    root = settings.reports_dir
    if not root.is_dir():
        return None
    weeks = sorted(p.name for p in root.iterdir() if WEEK_RE.match(p.name) and (p / "report.html").is_file())
    return weeks[-1] if weeks else None


def report_path(settings: Settings, week: str) -> Path | None:
    """report.html of ``week`` (validated: only ISO week names, only inside reports/)."""
    if not WEEK_RE.match(week):
        return None
    path = settings.reports_dir / week / "report.html"
    return path if path.is_file() else None


def image_path(settings: Settings, sha256: str) -> Path | None:
    """The stored original for a sha256, or None; anything not a lowercase sha256 is refused."""
    if not SHA256_RE.match(sha256):
        return None
    folder = settings.images_dir / sha256[:2] / sha256[2:4]
    if not folder.is_dir():
        return None
    root = settings.images_dir.resolve()
    for candidate in sorted(folder.glob(f"{sha256}.*")):
        resolved = candidate.resolve()
        if candidate.is_file() and resolved.is_relative_to(root) and resolved.stem == sha256:
            return resolved
    return None


def thumbnail(settings: Settings, sha256: str, side: int = THUMB_SIDE) -> bytes | None:
    """A JPEG thumbnail of a stored image (decoded in draft mode: fast on 12 MP photos)."""
    path = image_path(settings, sha256)
    if path is None:
        return None
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.draft("RGB", (side, side))
            img = ImageOps.exif_transpose(im).convert("RGB")
            img.thumbnail((side, side))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=82)
            return buf.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        log.info("mining view: no thumbnail for %s: %s", sha256, exc)
        return None


# ---- rendering -----------------------------------------------------------------------------
CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:16px;color:#1d2433;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:24px 0 8px;border-bottom:1px solid #dde1e8}
.muted{color:#667085} .pill{display:inline-block;padding:1px 8px;border-radius:10px;background:#eef1f6;margin-right:6px}
.banner{padding:10px 14px;border-radius:6px;margin:12px 0;background:#fff4e5;border:1px solid #f5c27a}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px}
.card{border:1px solid #dde1e8;border-radius:8px;overflow:hidden;background:#fafbfc}
.card img{width:100%;height:170px;object-fit:cover;display:block;background:#e4e7ec}
.card .meta{padding:6px 8px;font-size:12px} .card .title{font-weight:600;white-space:nowrap;overflow:hidden;
text-overflow:ellipsis}
table{border-collapse:collapse;width:100%;font-size:12.5px} th,td{text-align:left;padding:4px 6px;
border-bottom:1px solid #eef0f4;vertical-align:top} th{background:#f4f6f9}
.reason{max-width:520px} form.filters{display:flex;gap:10px;align-items:end;flex-wrap:wrap;margin-bottom:8px}
form.filters label{display:flex;flex-direction:column;font-size:12px} iframe{width:100%;height:700px;
border:1px solid #dde1e8;border-radius:6px}
code{font-size:12px;background:#f4f6f9;padding:0 3px;border-radius:3px}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _e(value)


def _when(value: Any) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    return _e(value)


def _permalink(permalink: str | None) -> str | None:
    if not permalink:
        return None
    if permalink.startswith("/"):
        return REDDIT + permalink
    return permalink if permalink.startswith(("http://", "https://")) else None


def _link(url: str | None, text: str) -> str:
    return f'<a href="{_e(url)}" target="_blank" rel="noopener noreferrer">{_e(text)}</a>' if url else _e(text)


def render_page(page: MiningPage) -> str:
    """The whole page as HTML; every value from the warehouse is escaped."""
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width,initial-scale=1'><title>Mining</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>Mining</h1><div class=muted>Results of the hourly pipeline, read from the warehouse "
        "(<code>mined_images</code>). Read-only.</div>",
    ]
    if page.status != "ok":
        parts.append(f"<div class=banner id=status data-status={_e(page.status)}>{_e(page.message)}</div>")
    if page.totals:
        parts.append("<p id=totals>" + "".join(
            f"<span class=pill>{_e(k)}: <b>{v}</b></span>" for k, v in page.totals.items()) + "</p>")
    parts.append(_accepted_html(page))
    parts.append(_rejections_html(page))
    parts.append(_models_html(page))
    parts.append(_report_html(page))
    if page.runs:
        parts.append(_runs_html(page))
    parts.append("</body></html>")
    return "\n".join(parts)


def _accepted_html(page: MiningPage) -> str:
    out = [f"<h2 id=accepted>Latest accepted images ({len(page.accepted)})</h2>"]
    if not page.accepted:
        out.append("<p class=muted>No accepted images yet.</p>")
        return "\n".join(out)
    out.append("<div class=grid>")
    for row in page.accepted:
        sha = str(row["sha256"])
        title = row.get("title") or row.get("post_id")
        out.append(
            f'<div class=card data-sha256="{_e(sha)}">'
            f'<a href="{_e(row.get("image_url"))}" target="_blank" rel="noopener noreferrer">'
            f'<img src="thumb/{_e(sha)}.jpg" alt="{_e(title)}" loading="lazy"></a>'
            f'<div class=meta><div class=title title="{_e(title)}">{_e(title)}</div>'
            f'<div>r/{_e(row.get("subreddit"))} · {_link(_permalink(row.get("permalink")), "post")}</div>'
            f'<div class=muted>novelty {_num(row.get("novelty_score"))} ≥ {_num(row.get("novelty_threshold"))}'
            f' · watermark {_num(row.get("watermark_prob"))}</div>'
            f'<div class=muted>{_when(row.get("interval_start"))}'
            f'{" · published" if row.get("published_to") else ""}</div></div></div>')
    out.append("</div>")
    return "\n".join(out)


def _select(name: str, options: list[str], current: str) -> str:
    opts = [f'<option value=""{" selected" if not current else ""}>all</option>']
    for value in options:
        sel = " selected" if value == current else ""
        opts.append(f'<option value="{_e(value)}"{sel}>{_e(value)}</option>')
    return f"<label>{name}<select name={name}>{''.join(opts)}</select></label>"


def _rejections_html(page: MiningPage) -> str:
    f = page.filters
    out = [f"<h2 id=rejections>Recent rejections ({len(page.rejections)})</h2>",
           "<form class=filters method=get>",
           *(_select(name, page.facets.get(name, []), getattr(f, name)) for name in FILTERS),
           f"<label>limit<input name=limit type=number min=1 max={MAX_LIMIT} value={f.limit}></label>",
           "<button type=submit>Filter</button> <a href='?'>reset</a></form>"]
    if not page.rejections:
        out.append("<p class=muted>No rejections match.</p>")
        return "\n".join(out)
    out.append("<table id=rejection-table><tr><th>hour</th><th>subreddit</th><th>post</th><th>decision</th>"
               "<th>stage</th><th class=reason>reason</th><th>novelty</th><th>watermark</th></tr>")
    for row in page.rejections:
        title = row.get("title") or row.get("post_id")
        out.append(
            f"<tr><td>{_when(row.get('interval_start'))}</td><td>r/{_e(row.get('subreddit'))}</td>"
            f"<td>{_link(_permalink(row.get('permalink')), str(title))}</td>"
            f"<td>{_e(row.get('decision'))}</td><td>{_e(row.get('stage'))}</td>"
            f"<td class=reason>{_e(row.get('reason'))}</td><td>{_num(row.get('novelty_score'))}</td>"
            f"<td>{_num(row.get('watermark_prob'))}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _metrics(value: Any) -> str:
    if value is None:
        return "–"
    data = value
    if isinstance(value, str):
        try:
            data = json.loads(value)
        except ValueError:
            return _e(value)
    if isinstance(data, dict):
        return ", ".join(f"{_e(k)}={_num(v)}" for k, v in sorted(data.items())
                         if isinstance(v, int | float | str | bool | type(None))) or "–"
    return _e(data)


def _models_html(page: MiningPage) -> str:
    out = ["<h2 id=models>Active models</h2>"]
    if not page.models:
        out.append("<p class=muted>No model versions recorded yet.</p>")
        return "\n".join(out)
    out.append("<table><tr><th>kind</th><th>version</th><th>threshold</th><th>train size</th><th>metrics</th>"
               "<th>activated</th></tr>")
    for m in page.models:
        out.append(f"<tr><td>{_e(m.get('kind'))}</td><td><code>{_e(m.get('version'))}</code></td>"
                   f"<td>{_num(m.get('threshold'), 4)}</td><td>{_num(m.get('train_size'))}</td>"
                   f"<td>{_metrics(m.get('metrics'))}</td><td>{_when(m.get('activated_at'))}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _report_html(page: MiningPage) -> str:
    if not page.report_week:
        return "<h2 id=report>Weekly report</h2><p class=muted>No weekly report yet (mining_weekly writes one).</p>"
    week = _e(page.report_week)
    return (f"<h2 id=report>Weekly report {week}</h2><p><a href='report/{week}' target=_blank>open full page</a>"
            f"</p><iframe src='report/{week}' title='weekly report {week}' loading=lazy></iframe>")


def _runs_html(page: MiningPage) -> str:
    out = ["<h2 id=runs>Recent runs</h2><table><tr><th>dag</th><th>step</th><th>interval</th><th>status</th>"
           "<th>finished</th><th>counts</th></tr>"]
    for r in page.runs:
        out.append(f"<tr><td>{_e(r.get('dag_id'))}</td><td>{_e(r.get('step'))}</td>"
                   f"<td>{_when(r.get('interval_start'))}</td><td>{_e(r.get('status'))}</td>"
                   f"<td>{_when(r.get('finished_at'))}</td><td>{_metrics(r.get('counts'))}</td></tr>")
    out.append("</table>")
    return "\n".join(out)
