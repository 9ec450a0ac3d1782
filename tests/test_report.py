"""The weekly source report, checked against SQL computed independently from the raw tables.

``build_activity`` writes four weeks of synthetic but realistic activity into a real
warehouse (the project's migrations): watched subreddits with different acceptance rates,
a barren watched one, subreddits seen only through r/all, galleries, skipped/failed
downloads, unscored candidates, coverage gaps and a failed fetch. The discovery, refit and
browser tests reuse it.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

from mining.report import (
    REASON_CLASSES,
    build_report,
    last_complete_week,
    shift_week,
    week_bounds,
    week_of,
)
from mining.settings import Settings, load_settings

WEEKS = ("2026-W44", "2026-W45", "2026-W46", "2026-W47")
REPORT_WEEK = "2026-W47"
EMBED_MODEL = "test-embedder@1"
DIM = 16
WATCHED = ("EarthPorn", "SkyPorn", "BarrenPics")
# subreddit -> (listing it is seen through, posts per week, share of candidates accepted)
PROFILES = {
    "EarthPorn": ("EarthPorn", 30, 0.6),
    "SkyPorn": ("SkyPorn", 20, 0.3),
    "BarrenPics": ("BarrenPics", 12, 0.0),
    "CityPorn": ("all", 10, 0.6),
    "FoodPorn": ("all", 8, 0.5),
    "ArchitecturePorn": ("all", 10, 0.4),
    "Aww": ("all", 10, 0.1),
    "MemeDump": ("all", 15, 0.0),
}
WEEK_FACTOR = (0.8, 1.0, 0.7, 1.2)
# what happens to candidates that are not accepted, in rotation
OTHER_OUTCOMES = ("novelty", "novelty", "watermark", "duplicate", "skipped", "failed", "novelty", "pending")


@dataclass
class Activity:
    """Ground truth of what build_activity wrote (the tests also recompute it in SQL)."""

    mu: np.ndarray
    accepted: dict[tuple[str, str], int] = field(default_factory=dict)  # (week, subreddit) -> n
    candidates: dict[tuple[str, str], int] = field(default_factory=dict)
    posts: dict[tuple[str, str], int] = field(default_factory=dict)


def naive(dt: datetime) -> datetime:
    return dt.astimezone(UTC).replace(tzinfo=None)


def _insert(con, table: str, rows: list[dict]) -> None:  # type: ignore[no-untyped-def]
    if not rows:
        return
    arrow = pa.Table.from_pylist(rows)
    con.register("_rows", arrow)
    try:
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _rows")
    finally:
        con.unregister("_rows")


def _jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> bytes:
    img = Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(img)
    for x in range(0, size[0], 8):  # some structure so thumbnails are not flat
        draw.line((x, 0, x, size[1]), fill=(255 - colour[0], 255 - colour[1], 255 - colour[2]))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def liked_vector(mu: np.ndarray, rng: np.random.Generator, spread: float = 0.35) -> np.ndarray:
    v = mu + spread * rng.standard_normal(len(mu))
    return (v / np.linalg.norm(v)).astype(np.float32)


def junk_vector(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


def build_activity(settings: Settings, weeks: tuple[str, ...] = WEEKS, seed: int = 0,
                   images_week: str = REPORT_WEEK) -> Activity:
    """Write posts, coverage, candidates, scores, embeddings and the watch list for ``weeks``."""
    from mining.warehouse import Warehouse

    rng = np.random.default_rng(seed)
    mu = rng.standard_normal(DIM)
    mu /= np.linalg.norm(mu)
    act = Activity(mu=mu)
    posts, coverage, candidates, scores, embeddings = [], [], [], [], []
    for wi, week in enumerate(weeks):
        start, _ = week_bounds(week)
        for si, (sub, (source, n_posts, accept)) in enumerate(PROFILES.items()):
            n_posts = n_posts + (wi % 3) - 1
            post_ids = []
            for i in range(n_posts):
                pid = f"{week[-2:]}{si}x{i:03d}"
                created = start + timedelta(hours=(i * 37 + si * 11) % 168, minutes=(i * 7) % 60)
                # watched subreddits are also met through r/all now and then
                seen_via = "all" if (source != "all" and i % 5 == 4) else source
                posts.append({
                    "post_id": pid, "subreddit": sub, "source": seen_via, "title": f"{sub} photo {i}",
                    "author": f"user{i % 7}", "permalink": f"https://www.reddit.com/r/{sub}/comments/{pid}/x/",
                    "url": f"https://i.redd.it/{pid}.jpg", "domain": "i.redd.it", "created_utc": naive(created),
                    "over_18": False, "is_self": False, "is_video": False, "is_gallery": i % 7 == 3,
                    "is_crosspost": False, "removed_by_category": None, "score": 10 + i, "num_comments": i,
                    "fetched_at": naive(created + timedelta(minutes=30)),
                    "interval_start": naive(created.replace(minute=0)),
                })
                post_ids.append((pid, created, 2 if i % 7 == 3 else 1))
            act.posts[(week, sub)] = n_posts
            slots = [(pid, created, pos) for pid, created, n in post_ids for pos in range(n)]
            n_acc = round(len(slots) * min(1.0, accept * WEEK_FACTOR[wi % 4]))
            act.candidates[(week, sub)] = len(slots)
            act.accepted[(week, sub)] = n_acc
            order = rng.permutation(len(slots))
            for rank, k in enumerate(order):
                pid, created, pos = slots[k]
                outcome = "accepted" if rank < n_acc else OTHER_OUTCOMES[(rank - n_acc + si) % len(OTHER_OUTCOMES)]
                cid = f"{pid}:{pos}"
                sha = hashlib.sha256(cid.encode()).hexdigest()
                hour = naive(created.replace(minute=0))
                status = {"skipped": "skipped:too_small", "failed": "failed:http_404"}.get(outcome, "downloaded")
                rel = f"images/{sha[:2]}/{sha[2:4]}/{sha}.jpg" if status == "downloaded" else None
                candidates.append({
                    "candidate_id": cid, "post_id": pid, "subreddit": sub, "position": pos, "kind": "ireddit",
                    "url": f"https://i.redd.it/{pid}_{pos}.jpg", "known_width": 2000, "known_height": 1500,
                    "status": status, "sha256": sha if rel else None, "path": rel, "format": "JPEG" if rel else None,
                    "width": 2000, "height": 1500, "bytes": 123456, "http_status": 200 if rel else 404,
                    "elapsed_s": 0.1, "interval_start": hour,
                })
                if rel is None:
                    continue
                vec = liked_vector(mu, rng) if outcome in ("accepted", "watermark", "duplicate") else junk_vector(rng)
                embeddings.append({"sha256": sha, "model": EMBED_MODEL, "dim": DIM, "embedding": vec.tolist(),
                                   "interval_start": hour})
                if outcome == "accepted" and week == images_week:
                    path = settings.home / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(_jpeg((40 * si % 256, 90 + 20 * si % 160, 200 - 15 * si % 200)))
                if outcome == "pending":
                    continue
                score = float(vec @ mu)
                decision, stage = {"accepted": ("accepted", "dedupe"), "novelty": ("rejected", "novelty"),
                                   "watermark": ("rejected", "watermark"),
                                   "duplicate": ("duplicate", "dedupe")}[outcome]
                scores.append({
                    "candidate_id": cid, "post_id": pid, "sha256": sha, "novelty_model": "knn-test",
                    "novelty_score": score, "novelty_threshold": 0.5, "watermark_model": "wm-test",
                    "watermark_prob": 0.9 if outcome == "watermark" else 0.1, "watermark_threshold": 0.5,
                    "phash": "0" * 16, "duplicate_of": None, "hamming": None, "decision": decision,
                    "stage": stage, "reason": f"{stage}: synthetic {outcome}", "scored_at": hour + timedelta(hours=1),
                    "interval_start": hour, "origin": "score",
                })
        for h in range(168):
            hour = naive(start + timedelta(hours=h))
            for source in ("all", *WATCHED):
                is_all = source == "all"
                gap = is_all and h % 24 == 23
                error = "http 503" if (source == "SkyPorn" and h == 100) else None
                coverage.append({
                    "source": source, "interval_start": hour, "fetched_at": hour + timedelta(hours=1),
                    "collector": "hourly", "pages": 3 if is_all else 1, "requests": 3 if is_all else 1 + (h % 2),
                    "posts_seen": 300 if is_all else 5, "posts_kept": 40 if is_all else 1, "oldest_seen": hour,
                    "newest_seen": hour + timedelta(minutes=59), "reached_boundary": not gap, "gap": gap,
                    "error": error,
                })
    with Warehouse.open(settings) as wh:
        con = wh.con
        for table, rows in (("posts", posts), ("coverage", coverage), ("candidates", candidates),
                            ("scores", scores), ("embeddings", embeddings)):
            _insert(con, table, rows)
        con.execute("DELETE FROM watch_list")
        _insert(con, "watch_list", [{"subreddit": s, "added_at": datetime(2026, 10, 1), "added_by": "user",
                                     "active": True, "note": None} for s in WATCHED])
    return act


@pytest.fixture
def weekly_settings(mining_home: Path) -> Settings:
    return load_settings(env={}, home=mining_home, watch_list=WATCHED)


@pytest.fixture
def activity(weekly_settings: Settings) -> Activity:
    return build_activity(weekly_settings)


# ---- independent SQL -----------------------------------------------------------------------------


def sql_by_subreddit(settings: Settings, week: str) -> dict[str, dict[str, int]]:
    """Per-subreddit numbers straight from posts/candidates/scores (no views)."""
    from mining.warehouse import Warehouse

    s, e = (naive(x) for x in week_bounds(week))
    out: dict[str, dict[str, int]] = {}
    with Warehouse.open(settings, read_only=True) as wh:
        con = wh.con
        for sub, n in con.execute("SELECT subreddit, count(*) FROM posts WHERE created_utc >= ? AND created_utc < ? "
                                  "GROUP BY 1", [s, e]).fetchall():
            out.setdefault(sub, {})["posts_seen"] = n
        rows = con.execute("""
            SELECT c.subreddit, count(*) AS candidates,
                   count(*) FILTER (WHERE sc.decision = 'accepted'),
                   count(*) FILTER (WHERE sc.decision = 'rejected' AND sc.stage = 'novelty'),
                   count(*) FILTER (WHERE sc.decision = 'rejected' AND sc.stage = 'watermark'),
                   count(*) FILTER (WHERE sc.decision = 'duplicate'),
                   count(*) FILTER (WHERE sc.candidate_id IS NULL AND c.status LIKE 'failed%'),
                   count(*) FILTER (WHERE sc.candidate_id IS NULL AND c.status LIKE 'skipped%'),
                   count(*) FILTER (WHERE sc.candidate_id IS NULL AND c.status = 'downloaded')
            FROM candidates c LEFT JOIN scores sc ON sc.candidate_id = c.candidate_id AND sc.origin = 'score'
            WHERE c.interval_start >= ? AND c.interval_start < ? GROUP BY 1""", [s, e]).fetchall()
        for sub, cand, acc, nov, wm, dup, failed, skipped, pending in rows:
            out.setdefault(sub, {}).update(
                candidates=cand, accepted=acc, rejected_novelty=nov, rejected_watermark=wm,
                rejected_duplicate=dup, rejected_failed=failed, rejected_skipped=skipped, pending=pending)
        # requests: each listing's requests shared by the subreddits it yielded, by post count
        req = dict(con.execute("SELECT source, sum(requests) FROM coverage WHERE interval_start >= ? "
                               "AND interval_start < ? GROUP BY 1", [s, e]).fetchall())
        seen = con.execute("SELECT source, subreddit, count(*) FROM posts WHERE created_utc >= ? AND created_utc < ? "
                           "GROUP BY 1, 2", [s, e]).fetchall()
    per_source: dict[str, int] = {}
    for source, _, n in seen:
        per_source[source] = per_source.get(source, 0) + n
    for source, sub, n in seen:
        d = out[sub]
        d["requests"] = d.get("requests", 0.0) + req.get(source, 0) * n / per_source[source]
    return out


def test_report_numbers_match_independent_sql(weekly_settings: Settings, activity: Activity) -> None:
    result = build_report(weekly_settings, REPORT_WEEK)
    data = json.loads(Path(result.json_path).read_text())
    expected, previous = sql_by_subreddit(weekly_settings, REPORT_WEEK), sql_by_subreddit(weekly_settings, "2026-W46")
    got = {e["subreddit"]: e for e in data["subreddits"]}
    assert set(got) == set(expected) == set(PROFILES)
    for sub, exp in expected.items():
        g = got[sub]
        for key in ("posts_seen", "candidates", "accepted", "pending", *(f"rejected_{c}" for c in REASON_CLASSES)):
            assert g[key] == exp[key], (sub, key)
        assert g["requests"] == pytest.approx(exp["requests"])
        assert g["accepted_per_request"] == pytest.approx(exp["accepted"] / exp["requests"])
        assert g["acceptance_rate"] == pytest.approx(exp["accepted"] / exp["candidates"])
        assert g["accepted_change"] == exp["accepted"] - previous[sub]["accepted"]
        # and against the generator's own ground truth
        assert g["accepted"] == activity.accepted[(REPORT_WEEK, sub)]
        assert g["candidates"] == activity.candidates[(REPORT_WEEK, sub)]
        assert g["posts_seen"] == activity.posts[(REPORT_WEEK, sub)]
        assert g["on_watch_list"] == (sub in WATCHED)
    t = data["totals"]
    assert t["accepted"] == result.accepted == sum(e["accepted"] for e in expected.values())
    assert t["requests"] == pytest.approx(sum(e["requests"] for e in expected.values()))
    assert [e["accepted"] for e in data["top_subreddits"]] == sorted((e["accepted"] for e in expected.values()
                                                                      if e["accepted"]), reverse=True)
    # the acceptance rates really differ between subreddits (the fixture is not degenerate)
    rates = {sub: g["acceptance_rate"] for sub, g in got.items()}
    assert rates["EarthPorn"] > rates["SkyPorn"] > rates["BarrenPics"] == 0


def test_report_sources_and_gaps_match_coverage(weekly_settings: Settings, activity: Activity) -> None:
    from mining.warehouse import Warehouse

    data = build_report(weekly_settings, REPORT_WEEK).data
    s, e = (naive(x) for x in week_bounds(REPORT_WEEK))
    with Warehouse.open(weekly_settings, read_only=True) as wh:
        gaps = wh.con.execute("SELECT source, count(*) FROM coverage WHERE gap AND interval_start >= ? "
                              "AND interval_start < ? GROUP BY 1", [s, e]).fetchall()
        errors = wh.con.execute("SELECT count(*) FROM coverage WHERE error IS NOT NULL AND interval_start >= ? "
                                "AND interval_start < ?", [s, e]).fetchall()[0][0]
        requests = dict(wh.con.execute("SELECT source, sum(requests) FROM coverage WHERE interval_start >= ? "
                                       "AND interval_start < ? GROUP BY 1", [s, e]).fetchall())
    assert dict(gaps) == {"all": 7}
    assert data["totals"]["coverage_gaps"] == 7 and data["totals"]["coverage_errors"] == errors == 1
    assert len(data["coverage_gaps"]) == 8
    by_source = {x["source"]: x for x in data["sources"]}
    assert {k: v["requests"] for k, v in by_source.items()} == requests
    assert by_source["all"]["gaps"] == 7 and by_source["SkyPorn"]["errors"] == 1
    # every accepted image is attributed to exactly one listing source
    assert sum(x["accepted"] for x in data["sources"]) == data["totals"]["accepted"]


def test_report_tables_and_idempotent_rerun(weekly_settings: Settings, activity: Activity) -> None:
    from mining.warehouse import Warehouse

    first = build_report(weekly_settings, REPORT_WEEK)
    first_json = json.loads(Path(first.json_path).read_text())
    second = build_report(weekly_settings, REPORT_WEEK)
    second_json = json.loads(Path(second.json_path).read_text())
    for d in (first_json, second_json):
        d.pop("generated_at")
    assert first_json == second_json
    build_report(weekly_settings, "2026-W46")
    with Warehouse.open(weekly_settings, read_only=True) as wh:
        weeks = wh.con.execute("SELECT week, accepted, candidates FROM report_weeks ORDER BY week").fetchall()
        rows = wh.con.execute("SELECT subreddit, accepted, rejected_novelty, requests FROM report_sources "
                              "WHERE week = ? ORDER BY subreddit", [REPORT_WEEK]).fetchall()
        dupes = wh.con.execute("SELECT count(*) FROM (SELECT week, subreddit FROM report_sources "
                               "GROUP BY 1, 2 HAVING count(*) > 1)").fetchall()[0][0]
    assert [w[0] for w in weeks] == ["2026-W46", REPORT_WEEK]
    assert weeks[1][1] == first.accepted and weeks[1][2] == first.candidates
    assert dupes == 0
    expected = sorted((e["subreddit"], e["accepted"], e["rejected_novelty"]) for e in second.data["subreddits"])
    assert [r[:3] for r in rows] == expected


def test_report_files_charts_and_contact_sheet(weekly_settings: Settings, activity: Activity) -> None:
    result = build_report(weekly_settings, REPORT_WEEK)
    out = weekly_settings.reports_dir / REPORT_WEEK
    assert {p.name for p in out.iterdir()} == {"report.html", "report.md", "report.json", "contact_sheet.jpg"}
    html_text = (out / "report.html").read_text()
    assert html_text.count("<svg") == 4
    assert 'id="contact-sheet"' in html_text and "data:image/jpeg;base64," in html_text
    assert "http://" not in html_text.split("<body>")[0]  # self-contained: nothing fetched
    assert "r/EarthPorn" in html_text and "r/CityPorn" in html_text
    sheet = Image.open(out / "contact_sheet.jpg")
    assert sheet.format == "JPEG"
    n = min(weekly_settings.report_contact_sheet_size, sum(activity.accepted[(REPORT_WEEK, s)] for s in PROFILES))
    assert result.contact_images == n
    assert sheet.width == 6 * 240 and sheet.height == ((n + 5) // 6) * (180 + 22)
    scores = [b["novelty_score"] for b in result.data["contact_sheet"]]
    assert scores == sorted(scores, reverse=True)  # the best first
    md = (out / "report.md").read_text()
    assert md.startswith(f"# Sources of the week {REPORT_WEEK}") and "| r/EarthPorn |" in md


def test_report_of_an_empty_week(weekly_settings: Settings, activity: Activity) -> None:
    result = build_report(weekly_settings, "2026-W30")
    assert result.accepted == 0 and result.subreddits == 0 and result.contact_images == 0
    assert Image.open(result.contact_sheet_path).size == (720, 180)  # placeholder
    assert "No proposals" in Path(result.html_path).read_text()


def test_iso_weeks() -> None:
    start, end = week_bounds("2026-W47")
    assert start == datetime(2026, 11, 16, tzinfo=UTC) and end - start == timedelta(days=7)
    assert week_of(datetime(2026, 11, 22, 23, 59, tzinfo=UTC)) == "2026-W47"
    assert last_complete_week(datetime(2026, 11, 23, 14, 0, tzinfo=UTC)) == "2026-W47"
    assert shift_week("2027-W01", -1) == "2026-W53"
    for bad in ("2026-47", "2026-W54", "W47"):
        with pytest.raises(ValueError):
            week_bounds(bad)


def test_cli_report(weekly_settings: Settings, activity: Activity, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str]) -> None:
    from mining.cli import main

    monkeypatch.setenv("MINING_HOME", str(weekly_settings.home))
    assert main(["report", "--week", REPORT_WEEK, "--discover"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["week"] == REPORT_WEEK and printed["proposals"] >= 1
    assert Path(printed["html_path"]).is_file()
