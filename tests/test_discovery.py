"""Discovery: r/all subreddits proposed with evidence, promotion limits, barren entries, the watch list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_report import PROFILES, REPORT_WEEK, WATCHED, build_activity, naive

from mining.discovery import effective_watch_list, propose
from mining.report import build_report, week_bounds
from mining.settings import Settings, load_settings


@pytest.fixture
def weekly_settings(mining_home: Path) -> Settings:
    return load_settings(env={}, home=mining_home, watch_list=WATCHED)


@pytest.fixture
def activity(weekly_settings: Settings):  # type: ignore[no-untyped-def]
    return build_activity(weekly_settings)


def sql_add_evidence(settings: Settings, week: str) -> dict[str, tuple[int, int]]:
    """(accepted, candidates) of r/all-only subreddits with accepted images, from raw tables."""
    from mining.warehouse import Warehouse

    s, e = (naive(x) for x in week_bounds(week))
    with Warehouse.open(settings, read_only=True) as wh:
        rows = wh.con.execute("""
            SELECT c.subreddit, count(*) FILTER (WHERE sc.decision = 'accepted'), count(*)
            FROM candidates c LEFT JOIN scores sc ON sc.candidate_id = c.candidate_id AND sc.origin = 'score'
            WHERE c.interval_start >= ? AND c.interval_start < ?
              AND c.subreddit IN (SELECT subreddit FROM posts WHERE source = 'all')
              AND lower(c.subreddit) NOT IN (SELECT lower(subreddit) FROM watch_list WHERE active)
            GROUP BY 1 HAVING count(*) FILTER (WHERE sc.decision = 'accepted') > 0""", [s, e]).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def test_proposals_add_and_remove_with_evidence(weekly_settings: Settings, activity) -> None:  # type: ignore[no-untyped-def]
    proposals = propose(weekly_settings, REPORT_WEEK)
    adds = {p.subreddit: p for p in proposals if p.action == "add"}
    removes = {p.subreddit: p for p in proposals if p.action == "remove"}
    expected = sql_add_evidence(weekly_settings, REPORT_WEEK)
    assert set(adds) == set(expected) == {"CityPorn", "FoodPorn", "ArchitecturePorn", "Aww"}
    for sub, (acc, cand) in expected.items():
        ev = adds[sub].evidence
        assert (ev["accepted"], ev["candidates"]) == (acc, cand)
        assert ev["acceptance_rate"] == pytest.approx(acc / cand)
        assert 1 <= len(ev["samples"]) <= 3 and all(f"/r/{sub}/comments/" in u for u in ev["samples"])
        assert adds[sub].status == "proposed"
    # MemeDump never had an image accepted; watched subreddits are never proposed for adding
    assert "MemeDump" not in adds and not set(adds) & set(WATCHED)
    assert set(removes) == {"BarrenPics"}
    assert removes["BarrenPics"].evidence["accepted"] == 0
    assert removes["BarrenPics"].evidence["candidates"] >= weekly_settings.discovery_barren_min_candidates
    # nothing promoted by default, and the watch list is untouched
    assert sorted(effective_watch_list(weekly_settings)) == sorted(WATCHED)


def test_barren_needs_enough_candidates_and_time(weekly_settings: Settings, activity) -> None:  # type: ignore[no-untyped-def]
    strict = weekly_settings.replace(discovery_barren_min_candidates=10_000)
    assert not [p for p in propose(strict, REPORT_WEEK) if p.action == "remove"]
    short = weekly_settings.replace(discovery_barren_weeks=1, discovery_barren_min_candidates=5)
    assert {p.subreddit for p in propose(short, REPORT_WEEK) if p.action == "remove"} == {"BarrenPics"}


def test_auto_promotion_respects_limits_and_is_idempotent(weekly_settings: Settings, activity) -> None:  # type: ignore[no-untyped-def]
    from mining.warehouse import Warehouse

    s = weekly_settings.replace(discovery_auto_promote=True, discovery_max_per_week=2, discovery_min_accepted=3,
                                discovery_min_rate=0.2)
    expected = sql_add_evidence(s, REPORT_WEEK)
    eligible = sorted((sub for sub, (a, c) in expected.items() if a >= 3 and a / c >= 0.2),
                      key=lambda sub: (-expected[sub][0], -expected[sub][0] / expected[sub][1], sub.lower()))
    assert len(eligible) == 3 and "Aww" not in eligible  # more eligible than the weekly limit
    first = propose(s, REPORT_WEEK)
    promoted = [p.subreddit for p in first if p.status == "promoted"]
    assert promoted == eligible[:2]
    watch = effective_watch_list(s)
    assert set(watch) == set(WATCHED) | set(promoted)
    # rerunning the week promotes nothing more and duplicates nothing
    second = propose(s, REPORT_WEEK)
    assert sorted(p.subreddit for p in second if p.status == "promoted") == sorted(promoted)
    assert {(p.subreddit, p.action) for p in second} == {(p.subreddit, p.action) for p in first}
    with Warehouse.open(s, read_only=True) as wh:
        rows = wh.con.execute("SELECT subreddit, action, status FROM discovery_proposals WHERE week = ?",
                              [REPORT_WEEK]).fetchall()
        by = dict(wh.con.execute("SELECT subreddit, added_by FROM watch_list").fetchall())
    assert len(rows) == len({(r[0], r[1]) for r in rows}) == len(second)
    assert all(by[p] == "discovery" for p in promoted)
    # the third eligible one waits for next week's allowance; Aww's rate/count is below the minimum
    statuses = {r[0]: r[2] for r in rows}
    assert statuses[eligible[2]] == "proposed" and statuses["Aww"] == "proposed"


def test_user_removal_is_never_undone(weekly_settings: Settings, activity) -> None:  # type: ignore[no-untyped-def]
    from mining.warehouse import Warehouse

    with Warehouse.open(weekly_settings) as wh:
        wh.add_to_watch_list("CityPorn", added_by="user")
        wh.set_watch_active("CityPorn", False, note="not for me")
    s = weekly_settings.replace(discovery_auto_promote=True, discovery_max_per_week=5)
    got = {p.subreddit: p for p in propose(s, REPORT_WEEK) if p.action == "add"}
    assert got["CityPorn"].status == "proposed" and "removed" in got["CityPorn"].evidence["note"]
    assert "CityPorn" not in effective_watch_list(s)
    assert got["FoodPorn"].status == "promoted"


def test_effective_watch_list_sources(mining_home: Path) -> None:
    from mining.warehouse import Warehouse

    s = load_settings(env={}, home=mining_home, watch_list=("EarthPorn", "SkyPorn"))
    assert effective_watch_list(s) == ("EarthPorn", "SkyPorn")  # no warehouse yet
    assert not s.warehouse_path.exists()  # ...and reading it did not create one
    with Warehouse.open(s) as wh:  # the first writer seeds the table from settings
        wh.add_to_watch_list("CityPorn", added_by="user")
        wh.set_watch_active("SkyPorn", False)
    assert effective_watch_list(s) == ("EarthPorn", "CityPorn")
    # a broken or busy warehouse falls back to the list last read, not to the settings
    s.warehouse_path.write_bytes(b"not a duckdb file" * 100)
    assert effective_watch_list(s) == ("EarthPorn", "CityPorn")


def test_report_includes_proposals(weekly_settings: Settings, activity) -> None:  # type: ignore[no-untyped-def]
    proposals = propose(weekly_settings, REPORT_WEEK)
    result = build_report(weekly_settings, REPORT_WEEK)
    data = json.loads(Path(result.json_path).read_text())
    assert {(p["subreddit"], p["action"]) for p in data["proposals"]} == {(p.subreddit, p.action) for p in proposals}
    assert result.proposals == len(proposals)
    html = Path(result.html_path).read_text()
    assert "r/CityPorn" in html and "remove" in html
    assert len(PROFILES) == result.subreddits


def test_cli_watch_edits_the_list_the_dags_read(mining_home: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from mining.cli import main

    monkeypatch.setenv("MINING_HOME", str(mining_home))
    monkeypatch.setenv("MINING_WATCH_LIST", "EarthPorn,SkyPorn")
    s = load_settings()
    assert main(["watch", "add", "r/CityPorn", "--note", "from the W47 report"]) == 0
    assert main(["watch", "remove", "SkyPorn"]) == 0
    assert main(["watch", "remove", "NeverThere"]) == 1
    capsys.readouterr()
    assert main(["watch", "list"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["subreddit"]: r["active"] for r in rows} == {"EarthPorn": True, "CityPorn": True, "SkyPorn": False}
    assert effective_watch_list(s) == ("EarthPorn", "CityPorn")
