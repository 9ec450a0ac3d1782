"""The Mining view: data access and HTML from a small warehouse built from lake partitions."""

from __future__ import annotations

import hashlib
import io
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from mining import ui
from mining.lake import Interval, write_partition
from mining.schemas import CANDIDATES, POSTS, SCORES
from mining.settings import Settings, load_settings
from mining.warehouse import Warehouse

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
HOUR = Interval(datetime(2026, 11, 20, 10, tzinfo=UTC), datetime(2026, 11, 20, 11, tzinfo=UTC))

# (post_id, subreddit, title, decision, stage, reason, status)
ROWS = [
    ("acc1", "EarthPorn", "Fjord at dawn", "accepted", "dedupe", "accepted: novel, clean", "downloaded"),
    ("acc2", "SkyPorn", "Storm <cell> & friends", "accepted", "dedupe", "accepted: novel, clean", "downloaded"),
    ("nov1", "EarthPorn", "A desk lamp", "rejected", "novelty", "novelty 0.41 < threshold 0.62", "downloaded"),
    ("wm1", "SkyPorn", "Sunset (c) someone", "rejected", "watermark", "watermark p=0.93 >= 0.50", "downloaded"),
    ("dup1", "EarthPorn", "Repost", "duplicate", "dedupe", "near-duplicate of gallery image (hamming 2)",
     "downloaded"),
    ("fail1", "EarthPorn", "Broken link", None, None, None, "failed:http_404"),
]


def _jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (900, 600)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def build_sample_warehouse(settings: Settings, report: bool = True) -> dict[str, str]:
    """Lake partitions for one hour (posts, candidates, scores), loaded into the warehouse; post_id -> sha256."""
    ts = HOUR.start.replace(minute=30)
    posts, cands, scores, shas = [], [], [], {}
    for n, (pid, sub, title, decision, stage, reason, status) in enumerate(ROWS):
        posts.append({"post_id": pid, "subreddit": sub, "source": sub, "title": title, "author": "u",
                      "permalink": f"https://www.reddit.com/r/{sub}/comments/{pid}/x/",
                      "url": f"https://i.redd.it/{pid}.jpg", "domain": "i.redd.it", "created_utc": ts,
                      "over_18": False, "is_self": False, "is_video": False, "is_gallery": False,
                      "is_crosspost": False, "removed_by_category": None, "score": 10, "num_comments": 1,
                      "fetched_at": ts, "raw_json": "{}"})
        sha = path = None
        if status == "downloaded":
            data = _jpeg((40 * n % 255, 120, 200 - 20 * n))
            sha = hashlib.sha256(data).hexdigest()
            rel = Path("images") / sha[:2] / sha[2:4] / f"{sha}.jpg"
            (settings.home / rel).parent.mkdir(parents=True, exist_ok=True)
            (settings.home / rel).write_bytes(data)
            path, shas[pid] = str(rel), sha
        cands.append({"candidate_id": f"{pid}:0", "post_id": pid, "subreddit": sub, "position": 0, "kind": "ireddit",
                      "url": f"https://i.redd.it/{pid}.jpg", "known_width": None, "known_height": None,
                      "status": status, "sha256": sha, "path": path, "format": "JPEG" if sha else None,
                      "width": 900 if sha else None, "height": 600 if sha else None, "bytes": None,
                      "http_status": 404 if status.startswith("failed") else 200, "elapsed_s": 0.1,
                      "interval_start": HOUR.start})
        if decision:
            scores.append({"candidate_id": f"{pid}:0", "post_id": pid, "sha256": sha, "novelty_model": "knn-v1",
                           "novelty_score": 0.8 if decision == "accepted" else 0.41, "novelty_threshold": 0.62,
                           "watermark_model": "wm-v1", "watermark_prob": 0.93 if pid == "wm1" else 0.05,
                           "watermark_threshold": 0.5, "phash": "ff00", "duplicate_of": None, "hamming": None,
                           "decision": decision, "stage": stage, "reason": reason, "scored_at": ts,
                           "interval_start": HOUR.start})
    lake = settings.lake_dir
    write_partition(lake, "posts", HOUR, pa.Table.from_pylist(posts, schema=POSTS))
    write_partition(lake, "candidates", HOUR, pa.Table.from_pylist(cands, schema=CANDIDATES))
    write_partition(lake, "scores", HOUR, pa.Table.from_pylist(scores, schema=SCORES))
    with Warehouse.open(settings) as wh:
        wh.load(HOUR)
        wh.upsert_model_version("knn-v1", "novelty", params={"k": 5}, train_size=60,
                                metrics={"auroc": 0.951, "recall": 0.9}, threshold=0.62)
        wh.set_active_model("novelty", "knn-v1")
    if report:
        week = settings.reports_dir / "2026-W47"
        week.mkdir(parents=True)
        (week / "report.html").write_text("<html><body><h1>Week 2026-W47 report</h1></body></html>")
        (settings.reports_dir / "2026-W46").mkdir()
        (settings.reports_dir / "2026-W46" / "report.html").write_text("older")
    return shas


@pytest.fixture
def ui_settings(mining_home: Path) -> Settings:
    return load_settings(env={}, home=mining_home)


@pytest.fixture
def sample(ui_settings: Settings) -> dict[str, str]:
    return build_sample_warehouse(ui_settings)


def test_page_shows_accepted_thumbnails_with_scores_and_links(ui_settings: Settings, sample: dict[str, str]) -> None:
    page = ui.load_page(ui_settings, ui.Filters())
    assert page.status == "ok"
    assert [r["post_id"] for r in page.accepted] == ["acc1", "acc2"]
    html = ui.render_page(page)
    for pid in ("acc1", "acc2"):
        assert f'src="thumb/{sample[pid]}.jpg"' in html
    assert "https://www.reddit.com/r/EarthPorn/comments/acc1/x/" in html
    assert "novelty 0.800 ≥ 0.620" in html
    assert "Storm &lt;cell&gt; &amp; friends" in html  # escaped, not injected
    assert "<cell>" not in html


def test_rejections_with_reasons_and_filters(ui_settings: Settings, sample: dict[str, str]) -> None:
    page = ui.load_page(ui_settings, ui.Filters())
    assert {r["post_id"] for r in page.rejections} == {"nov1", "wm1", "dup1", "fail1"}
    html = ui.render_page(page)
    assert "novelty 0.41 &lt; threshold 0.62" in html
    assert "download: http_404" in html
    assert page.facets["stage"] == ["dedupe", "download", "novelty", "watermark"]

    by_stage = ui.load_page(ui_settings, ui.Filters.from_query({"stage": "watermark"}))
    assert [r["post_id"] for r in by_stage.rejections] == ["wm1"]
    by_sub = ui.load_page(ui_settings, ui.Filters.from_query({"subreddit": "SkyPorn"}))
    assert [r["post_id"] for r in by_sub.rejections] == ["wm1"]
    assert [r["post_id"] for r in by_sub.accepted] == ["acc2"]
    by_decision = ui.load_page(ui_settings, ui.Filters.from_query({"decision": "duplicate", "limit": "x"}))
    assert [r["post_id"] for r in by_decision.rejections] == ["dup1"]
    assert by_decision.filters.limit == 50
    assert '<option value="watermark" selected>' in ui.render_page(by_stage)


def test_models_and_latest_report(ui_settings: Settings, sample: dict[str, str]) -> None:
    page = ui.load_page(ui_settings, ui.Filters())
    assert page.report_week == "2026-W47"
    html = ui.render_page(page)
    assert "knn-v1" in html and "auroc=0.951" in html
    assert "src='report/2026-W47'" in html
    assert ui.report_path(ui_settings, "2026-W47") == ui_settings.reports_dir / "2026-W47" / "report.html"
    assert ui.report_path(ui_settings, "../../etc") is None


def test_thumbnails_only_for_stored_sha256(ui_settings: Settings, sample: dict[str, str]) -> None:
    thumb = ui.thumbnail(ui_settings, sample["acc1"])
    assert thumb is not None
    with Image.open(io.BytesIO(thumb)) as im:
        assert im.format == "JPEG" and max(im.size) <= ui.THUMB_SIDE
    (ui_settings.home / "secret.jpg").write_bytes(_jpeg((1, 2, 3)))
    for bad in ("../secret", "0" * 64, sample["acc1"].upper(), sample["acc1"][:63], "", "..%2Fsecret"):
        assert ui.thumbnail(ui_settings, bad) is None


def test_empty_home_says_so(ui_settings: Settings) -> None:
    page = ui.load_page(ui_settings, ui.Filters())
    assert page.status == "empty"
    assert "No warehouse yet" in ui.render_page(page)
    assert not ui_settings.warehouse_path.exists()  # the view never creates the warehouse


@contextmanager
def writer_elsewhere(settings: Settings) -> Iterator[None]:
    """A writer holding the warehouse from another thread (opens are re-entrant within one thread)."""
    opened, done = threading.Event(), threading.Event()

    def hold() -> None:
        with Warehouse.open(settings):
            opened.set()
            done.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    assert opened.wait(30)
    try:
        yield
    finally:
        done.set()
        thread.join()


def test_busy_warehouse_gives_a_friendly_page(ui_settings: Settings, sample: dict[str, str]) -> None:
    with writer_elsewhere(ui_settings):  # a writer holds the file (as load/publish do)
        page = ui.load_page(ui_settings, ui.Filters())
    assert page.status == "busy"
    html = ui.render_page(page)
    assert "warehouse is busy" in html and "retry" in html
    assert ui.load_page(ui_settings, ui.Filters()).status == "ok"  # and it recovers


def test_web_app_routes(ui_settings: Settings, sample: dict[str, str]) -> None:
    from fastapi.testclient import TestClient

    sys.path.insert(0, str(PLUGINS))
    try:
        from mining_view import create_app
    finally:
        sys.path.remove(str(PLUGINS))
    client = TestClient(create_app(ui_settings))
    page = client.get("/", params={"stage": "novelty"})
    assert page.status_code == 200 and "A desk lamp" in page.text and "Repost" not in page.text
    assert re.search(r"Recent rejections \(1\)", page.text)
    thumb = client.get(f"/thumb/{sample['acc2']}.jpg")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert client.get("/thumb/..%2F..%2Fwarehouse.duckdb").status_code == 404
    assert client.get("/thumb/" + "a" * 64 + ".jpg").status_code == 404
    assert "Week 2026-W47 report" in client.get("/report/2026-W47").text
    assert client.get("/report/2026-W99").status_code == 404
    with writer_elsewhere(ui_settings):
        busy = client.get("/")
    assert busy.status_code == 503 and "warehouse is busy" in busy.text
