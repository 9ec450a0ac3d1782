"""Incremental listings: interval ownership, merges, coverage gaps and the light collector."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mining import schemas
from mining.cli import main
from mining.devserver import DevServer, Response
from mining.lake import Interval, partition_path, read_partition
from mining.listings import collect, scrape_interval
from mining.reddit import RedditError
from mining.replay import RedditReplay, load_recorded_listing, make_post
from mining.settings import Secret, Settings

HOUR = Interval.parse("2026-03-01T10:00:00Z")
H0 = HOUR.start.timestamp()


def _posts(prefix: str, start: float, n: int, step: float, sub: str = "pics") -> list[dict]:
    return [make_post(f"{prefix}{i:03d}", start + i * step, sub) for i in range(n)]


@pytest.fixture
def fast(settings: Settings) -> Settings:
    """Anonymous settings with a budget that never gets in the way."""
    return settings.replace(requests_per_minute=10_000, listing_page_size=10)


@pytest.fixture
def replay(dev_server: DevServer) -> RedditReplay:
    return RedditReplay(dev_server, oauth=False)


def _posts_table(settings: Settings, hour: Interval = HOUR):
    return read_partition(settings.lake_dir, "posts", hour, schemas.POSTS)


def _coverage(settings: Settings, hour: Interval = HOUR) -> list[dict]:
    return read_partition(settings.lake_dir, "coverage", hour, schemas.COVERAGE).to_pylist()


def test_keeps_exactly_the_posts_created_in_the_interval(fast: Settings, replay: RedditReplay) -> None:
    replay.add_posts("all", _posts("a", H0 - 1800, 121, 30))  # 09:30 .. 10:30, every 30 s
    replay.add_posts("all", [make_post("edge0", H0), make_post("edge1", H0 + 3600), make_post("late", H0 + 5000)])
    result = scrape_interval(fast, HOUR)
    table = _posts_table(fast)
    ids = table.column("post_id").to_pylist()
    assert "edge0" in ids and "edge1" not in ids and "late" not in ids  # [start, end)
    assert ids == sorted(ids)
    created = table.column("created_utc").to_pylist()
    assert all(HOUR.contains(c) for c in created)
    assert len(ids) == 1 + 61  # edge0 plus a060..a120
    assert table.schema.equals(schemas.POSTS)
    assert result.counts["posts_kept"] == len(ids) and result.counts["gaps"] == 0
    row = table.to_pylist()[ids.index("a100")]
    assert row["permalink"] == "https://www.reddit.com/r/pics/comments/a100/post_a100/"
    assert row["source"] == "all" and row["url"] == "https://i.redd.it/a100.jpg"
    assert json.loads(row["raw_json"])["id"] == "a100"
    cov = {r["source"]: r for r in _coverage(fast)}
    assert cov["all"]["reached_boundary"] and not cov["all"]["gap"] and cov["all"]["collector"] == "hourly"
    assert cov["EarthPorn"]["posts_seen"] == 0 and cov["EarthPorn"]["reached_boundary"]


def test_rerun_gives_identical_rows_and_no_new_files(fast: Settings, replay: RedditReplay, virtual_clock) -> None:
    replay.add_posts("all", _posts("a", H0 - 600, 80, 60))
    scrape_interval(fast, HOUR)
    first = _posts_table(fast)
    files = sorted(p.relative_to(fast.lake_dir) for p in fast.lake_dir.rglob("*") if p.is_file())
    virtual_clock.sleep(600)
    second_result = scrape_interval(fast, HOUR)
    assert _posts_table(fast).equals(first)
    assert sorted(p.relative_to(fast.lake_dir) for p in fast.lake_dir.rglob("*") if p.is_file()) == files
    assert second_result.counts["posts_new"] == 0
    # The rerun stopped at posts the complete first run stored instead of paging to the start.
    assert second_result.counts["pages"] < 8


def test_merge_never_loses_posts_and_keeps_first_source(fast: Settings, replay: RedditReplay) -> None:
    early = _posts("a", H0 - 600, 30, 60)  # 09:50 .. 10:19
    replay.add_posts("all", early)
    scrape_interval(fast, HOUR)
    # Later: two posts deleted from Reddit, new ones arrive, one is also in the watch list, scores move.
    for gone in ("a015", "a016"):
        replay.remove_post("all", gone)
    later = _posts("b", H0 + 1500, 10, 60)
    replay.add_posts("all", [*later, {**early[20], "score": 99, "num_comments": 7}])
    replay.add_posts("EarthPorn", [make_post("b003", H0 + 1680, "EarthPorn"), make_post("old", H0 - 60)])
    scrape_interval(fast, HOUR)
    rows = {r["post_id"]: r for r in _posts_table(fast).to_pylist()}
    assert {"a015", "a016"} <= rows.keys()
    assert {f"b{i:03d}" for i in range(10)} <= rows.keys()
    assert len(rows) == 20 + 10
    assert rows["b003"]["source"] == "all"
    assert (rows["a020"]["score"], rows["a020"]["num_comments"]) == (99, 7)


def test_multi_hour_interval_writes_one_partition_per_hour(fast: Settings, replay: RedditReplay) -> None:
    replay.add_posts("all", _posts("a", H0 - 300, 50, 300))  # every 5 min from 09:55
    three = Interval(HOUR.start, HOUR.start + timedelta(hours=3))
    result = scrape_interval(fast, three)
    assert result.counts["partitions"] == 3
    for hour in three.hours():
        table = _posts_table(fast, hour)
        assert table.num_rows == 12
        assert all(hour.contains(c) for c in table.column("created_utc").to_pylist())
        assert partition_path(fast.lake_dir, "coverage", hour).exists()


def test_coverage_gap_when_page_cap_hit_first(fast: Settings, replay: RedditReplay) -> None:
    replay.add_posts("all", _posts("a", H0 - 60, 200, 15))  # 200 posts in 50 minutes
    result = scrape_interval(fast.replace(listing_max_pages=3), HOUR)
    cov = {r["source"]: r for r in _coverage(fast)}
    assert cov["all"]["gap"] and not cov["all"]["reached_boundary"]
    assert cov["all"]["pages"] == 3 and cov["all"]["posts_kept"] == 30
    assert not cov["EarthPorn"]["gap"]
    assert result.counts["gaps"] == 1


def test_coverage_gap_when_reddit_depth_cap_ends_the_listing(dev_server: DevServer, fast: Settings) -> None:
    replay = RedditReplay(dev_server, oauth=False, depth_cap=50)
    replay.add_posts("all", _posts("a", H0 - 60, 200, 15))
    scrape_interval(fast.replace(listing_depth_cap=50), HOUR)
    cov = {r["source"]: r for r in _coverage(fast)}
    assert cov["all"]["pages"] == 5 and cov["all"]["gap"]


def test_a_failing_source_is_recorded_and_others_continue(fast: Settings, replay: RedditReplay) -> None:
    replay.add_posts("all", _posts("a", H0 - 60, 20, 60))
    replay.inject(Response(403, b'{"reason": "private"}', {"Content-Type": "application/json"}), source="EarthPorn")
    result = scrape_interval(fast, HOUR)
    cov = {r["source"]: r for r in _coverage(fast)}
    assert "HTTP 403" in cov["EarthPorn"]["error"] and not cov["EarthPorn"]["gap"]
    assert cov["all"]["error"] is None
    assert result.counts["sources_failed"] == 1 and _posts_table(fast).num_rows == 19


def test_all_sources_failing_raises(fast: Settings, replay: RedditReplay) -> None:
    replay.inject(*[Response(500, b"down")] * 20)
    with pytest.raises(RedditError, match="every source failed"):
        scrape_interval(fast.replace(max_retries=1), HOUR)
    assert all(r["error"] for r in _coverage(fast))  # still recorded


def test_collector_fills_same_partitions_and_records_gaps(fast: Settings, replay: RedditReplay) -> None:
    now = HOUR.start + timedelta(minutes=40)
    replay.add_posts("all", _posts("a", H0 + 600, 30, 30))  # 10:10 .. 10:24:30
    scrape_interval(fast, HOUR)
    s = fast.replace(collector_pages=2)
    first = collect(s, now=now)
    assert first.counts["posts_new"] == 0 and first.counts["gaps"] == 0
    replay.add_posts("all", _posts("b", H0 + 1500, 5, 60))  # 5 new posts: one page reaches the overlap
    second = collect(s, now=now + timedelta(minutes=5))
    assert second.counts["posts_new"] == 5 and second.counts["gaps"] == 0 and second.counts["requests"] == 1
    replay.add_posts("all", _posts("c", H0 + 1900, 40, 10))  # 40 new posts outrun 2 pages of 10
    third = collect(s, now=now + timedelta(minutes=10))
    assert third.counts["gaps"] == 1
    table = _posts_table(fast)
    ids = table.column("post_id").to_pylist()
    assert len(ids) == len(set(ids)) == 30 + 5 + 20
    cov = [r for r in _coverage(fast) if r["collector"] == "collector"]
    assert [r["gap"] for r in cov] == [False, False, True]
    assert table.to_pylist()[ids.index("b000")]["source"] == "all"


def test_collector_rolls_posts_into_their_own_hours(fast: Settings, replay: RedditReplay) -> None:
    replay.add_posts("all", _posts("a", H0 + 3600 - 50, 10, 10))  # 10:59:10 .. 11:00:40
    result = collect(fast, now=HOUR.end + timedelta(minutes=1))
    assert result.counts["partitions"] == 2
    assert _posts_table(fast).num_rows == 5
    assert _posts_table(fast, Interval.hour_of(HOUR.end)).num_rows == 5


def test_planted_secret_never_reaches_logs_lake_or_errors(settings: Settings, dev_server: DevServer,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    planted = "planted-Secret-9f8e7d"
    replay = RedditReplay(dev_server, client_id="cid", client_secret=planted)
    replay.add_posts("all", _posts("a", H0 - 60, 20, 60))
    s = settings.replace(reddit_client_id="cid", reddit_client_secret=Secret(planted), requests_per_minute=1000)
    caplog.set_level(logging.DEBUG)
    scrape_interval(s, HOUR)
    replay.inject(*[Response(500, b"down")] * 30)
    with pytest.raises(RedditError) as info:
        scrape_interval(s.replace(max_retries=1), HOUR)
    assert planted not in caplog.text and planted not in str(info.value)
    for path in s.home.rglob("*"):
        if path.is_file():
            assert planted.encode() not in path.read_bytes(), path


def test_cli_scrape_prints_a_json_summary(fast: Settings, replay: RedditReplay, dev_server: DevServer,
                                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    replay.add_posts("all", _posts("a", H0 - 60, 20, 60))
    for key, value in {"MINING_HOME": str(fast.home), "MINING_REDDIT_BASE_URL": dev_server.url,
                       "MINING_WATCH_LIST": "EarthPorn", "MINING_REQUESTS_PER_MINUTE": "1000"}.items():
        monkeypatch.setenv(key, value)
    assert main(["scrape", "--start", "2026-03-01T10:00:00"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["counts"]["posts_kept"] == 19 and Path(summary["path"]).exists()
    assert main(["collect"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == "collect"


@pytest.mark.shared
def test_recorded_pages_are_followed_with_after(fast: Settings, replay: RedditReplay, dev_server: DevServer,
                                                shared_reddit: Path) -> None:
    page1 = load_recorded_listing(shared_reddit / "r_reddit_api_test_new_2016_page1.json")
    page2 = load_recorded_listing(shared_reddit / "r_reddit_api_test_new_2016_page2.json")
    replay.add_posts("reddit_api_test", page1 + page2, keep_order=True)
    target = page2[10]
    hour = Interval.hour_of(datetime.fromtimestamp(target["created_utc"], UTC))
    s = fast.replace(sources=("reddit_api_test",), watch_list=(), listing_page_size=100)
    scrape_interval(s, hour)
    listing = [r for r in dev_server.log if r.path == "/r/reddit_api_test/new.json"]
    assert "after" not in listing[0].query and listing[1].query["after"] == "t3_37ouo3"
    expected = {p["id"] for p in page1 + page2 if hour.contains(datetime.fromtimestamp(p["created_utc"], UTC))}
    assert target["id"] in expected
    assert set(_posts_table(s, hour).column("post_id").to_pylist()) == expected


@pytest.mark.shared
def test_recorded_removed_posts_are_kept_as_posts(fast: Settings, replay: RedditReplay,
                                                  shared_reddit: Path) -> None:
    posts = load_recorded_listing(shared_reddit / "api_info_url_youtube_2020_removed_posts.json")
    removed = [p for p in posts if p.get("removed_by_category")]
    hour = Interval.hour_of(datetime.fromtimestamp(removed[0]["created_utc"], UTC))
    replay.add_posts("videos", posts)
    s = fast.replace(sources=("videos",), watch_list=(), listing_page_size=100, listing_max_pages=2)
    scrape_interval(s, hour)
    rows = {r["post_id"]: r for r in _posts_table(s, hour).to_pylist()}
    assert rows[removed[0]["id"]]["removed_by_category"] == removed[0]["removed_by_category"]
    in_hour = [p for p in posts if hour.contains(datetime.fromtimestamp(p["created_utc"], UTC))]
    assert set(rows) == {p["id"] for p in in_hour}
