"""Weekly refit: refused when the new model would be worse, activated when better, diff reported."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from test_report import DIM, EMBED_MODEL, REPORT_WEEK, WATCHED, build_activity, junk_vector, liked_vector, naive

from mining import novelty
from mining.refit import refit
from mining.report import build_report, week_bounds
from mining.settings import Settings, load_settings

N_LIKED = 40


@pytest.fixture
def weekly_settings(mining_home: Path) -> Settings:
    return load_settings(env={}, home=mining_home, watch_list=WATCHED)


@pytest.fixture
def activity(weekly_settings: Settings):  # type: ignore[no-untyped-def]
    return build_activity(weekly_settings)


def _sha(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


def add_gallery(settings: Settings, vectors: np.ndarray, source: str, tag: str, added_at: datetime) -> None:
    from mining.warehouse import Warehouse

    with Warehouse.open(settings) as wh:
        wh.add_to_gallery([{"sha256": _sha(f"{tag}{i}"), "path": None, "embedding": v, "embed_model": EMBED_MODEL,
                            "source": source, "added_at": added_at} for i, v in enumerate(vectors)])


def install_active(settings: Settings, liked: np.ndarray) -> novelty.FittedNovelty:
    """Fit, save and activate a model the way `mining init` does (files + model_versions)."""
    from mining.warehouse import Warehouse

    fitted = novelty.fit_and_select(liked, None, settings, embedder=EMBED_MODEL)
    novelty.save(settings, fitted)
    novelty.activate(settings, fitted.version)
    with Warehouse.open(settings) as wh:
        wh.upsert_model_version(version=fitted.version, kind="novelty", params=fitted.params,
                                train_size=fitted.train_size, metrics=fitted.metrics, threshold=fitted.threshold)
        wh.set_active_model("novelty", fitted.version)
    return fitted


def stream_junk(settings: Settings) -> np.ndarray:
    """Embeddings of the images the pipeline rejected for novelty (what corruption would copy)."""
    from mining.warehouse import Warehouse

    with Warehouse.open(settings, read_only=True) as wh:
        table = wh.con.sql("""SELECT e.embedding FROM embeddings e JOIN scores s USING (sha256)
                              WHERE s.stage = 'novelty' ORDER BY e.sha256""").to_arrow_table()
    return np.array(table.column("embedding").to_pylist(), dtype=np.float32)


def model_rows(settings: Settings) -> dict[str, bool]:
    from mining.warehouse import Warehouse

    with Warehouse.open(settings, read_only=True) as wh:
        return dict(wh.con.execute("SELECT version, active FROM model_versions WHERE kind = 'novelty'").fetchall())


def test_refit_refused_when_new_gallery_is_corrupted(weekly_settings: Settings, activity) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    liked = np.stack([liked_vector(activity.mu, rng) for _ in range(N_LIKED)])
    add_gallery(weekly_settings, liked, "liked", "liked", datetime(2026, 10, 1))
    active = install_active(weekly_settings, liked)
    # the pipeline "published" near-copies of junk: the gallery now teaches that junk is good
    junk = stream_junk(weekly_settings)[:150]
    noisy = junk + 0.05 * rng.standard_normal(junk.shape).astype(np.float32)
    add_gallery(weekly_settings, noisy, "published", "junk", datetime(2026, 11, 20))

    result = refit(weekly_settings, REPORT_WEEK)

    assert not result.activated, result.note
    assert result.active_version == active.version
    assert result.new_auroc is not None and result.active_auroc is not None
    assert result.new_auroc < result.active_auroc
    assert novelty.active_version(weekly_settings) == active.version  # the live model did not change
    versions = model_rows(weekly_settings)
    assert versions == {active.version: True, result.new_version: False}  # both recorded
    assert (weekly_settings.novelty_dir / str(result.new_version) / "meta.json").is_file()
    assert result.train_size == N_LIKED + len(noisy) - result.heldout_size
    assert "refused" in result.note


def test_refit_activated_when_better_and_diff_matches(weekly_settings: Settings, activity) -> None:  # type: ignore[no-untyped-def]
    from mining.warehouse import Warehouse

    rng = np.random.default_rng(2)
    old = install_active(weekly_settings, np.stack([junk_vector(rng) for _ in range(N_LIKED)]))  # a poor model
    liked = np.stack([liked_vector(activity.mu, rng) for _ in range(N_LIKED)])
    add_gallery(weekly_settings, liked[:30], "liked", "old", datetime(2026, 10, 1))
    # ten liked images added after the active version: the held-out set it never saw
    later = datetime.now(UTC).replace(tzinfo=None) + timedelta(hours=1)
    add_gallery(weekly_settings, liked[30:], "liked", "new", later)

    result = refit(weekly_settings, REPORT_WEEK)

    assert result.activated, result.note
    assert result.heldout_size == 10 and "added since the active version" in result.note
    assert result.new_auroc is not None and result.active_auroc is not None
    assert result.new_auroc >= result.active_auroc
    assert novelty.active_version(weekly_settings) == result.new_version != old.version
    assert model_rows(weekly_settings) == {old.version: False, result.new_version: True}

    # the reported diff, recomputed: score the week's embeddings with the new version
    new = novelty.load_version(weekly_settings, str(result.new_version))
    s, e = (naive(x) for x in week_bounds(REPORT_WEEK))
    with Warehouse.open(weekly_settings, read_only=True) as wh:
        rows = wh.con.execute("""
            SELECT d.decision, d.stage, d.watermark_prob >= d.watermark_threshold, emb.embedding
            FROM decisions d JOIN (SELECT sha256, any_value(embedding) AS embedding FROM embeddings
                                   GROUP BY sha256) emb USING (sha256)
            WHERE d.interval_start >= ? AND d.interval_start < ?""", [s, e]).fetchall()
        recorded = wh.con.execute("SELECT changed, accepted_to_rejected, rejected_to_accepted, activated "
                                  "FROM refit_runs WHERE week = ?", [REPORT_WEEK]).fetchall()[0]
    passes = new.score(np.array([r[3] for r in rows], dtype=np.float32)) >= new.threshold
    a2r = sum(1 for r, ok in zip(rows, passes, strict=True) if r[0] == "accepted" and not ok)
    r2a = sum(1 for r, ok in zip(rows, passes, strict=True)
              if r[0] == "rejected" and r[1] == "novelty" and ok and not r[2])
    assert (result.accepted_to_rejected, result.rejected_to_accepted) == (a2r, r2a)
    assert result.rescored == sum(1 for r in rows if r[0] in ("accepted", "rejected"))
    assert recorded == (a2r + r2a, a2r, r2a, True)
    assert sum(sum(v.values()) for v in result.changes_by_subreddit.values()) == a2r + r2a
    # synthetic "accepted" images sit near the liked cluster: a good model keeps most of them
    assert a2r < 0.5 * sum(1 for r in rows if r[0] == "accepted")

    report = build_report(weekly_settings, REPORT_WEEK)
    assert report.data["refit"]["new_version"] == result.new_version
    assert "decisions change" in Path(report.html_path).read_text()


def test_refit_without_gallery_is_a_noted_skip(weekly_settings: Settings) -> None:
    result = refit(weekly_settings, REPORT_WEEK)
    assert not result.activated and result.new_version is None
    assert "mining init" in result.note


def test_refit_without_stream_is_a_noted_skip(weekly_settings: Settings) -> None:
    rng = np.random.default_rng(3)
    mu = np.ones(DIM) / np.sqrt(DIM)
    add_gallery(weekly_settings, np.stack([liked_vector(mu, rng) for _ in range(20)]), "liked", "l",
                datetime(2026, 10, 1))
    result = refit(weekly_settings, REPORT_WEEK)
    assert not result.activated and result.unlabelled_size == 0 and "skipped" in result.note
    assert novelty.active_version(weekly_settings) is None


def test_cli_refit(weekly_settings: Settings, activity, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                   capsys: pytest.CaptureFixture[str]) -> None:
    from mining.cli import main

    rng = np.random.default_rng(4)
    add_gallery(weekly_settings, np.stack([liked_vector(activity.mu, rng) for _ in range(N_LIKED)]), "liked", "c",
                datetime(2026, 10, 1))
    monkeypatch.setenv("MINING_HOME", str(weekly_settings.home))
    assert main(["refit", "--week", REPORT_WEEK]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["activated"] is True and out["active_version"] is None  # the first model goes live
    assert novelty.active_version(weekly_settings) == out["new_version"]
