"""Rescoring stored embeddings with a newer novelty model, keeping the old scores beside the new."""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_warehouse import HOUR, snapshot, write_hour

from mining.cli import main
from mining.lake import Interval, read_partition
from mining.settings import Settings, load_settings
from mining.warehouse import Warehouse, load_interval, rescore, rescore_path

TWO_HOURS = Interval(HOUR.start, HOUR.end + timedelta(hours=1))


class StandIn:
    """The novelty API rescoring relies on: version, threshold, score(X)."""

    def __init__(self, version: str = "stand-in-v2", threshold: float = 0.5) -> None:
        self.version, self.threshold = version, threshold
        self.calls = 0

    def score(self, X: np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.asarray(X)[:, 0].astype(np.float64)


@pytest.fixture
def wh_settings(mining_home: Path) -> Settings:
    return load_settings(env={}, home=mining_home, watch_list=("EarthPorn",))


@pytest.fixture
def lake(wh_settings: Settings) -> dict[str, list[dict[str, Any]]]:
    a = write_hour(wh_settings, HOUR, n_posts=20, seed=3)
    b = write_hour(wh_settings, Interval(HOUR.end, HOUR.end + timedelta(hours=1)), n_posts=20, seed=4)
    load_interval(wh_settings, TWO_HOURS)
    return {k: a[k] + b[k] for k in a}


def _expected(old: dict[str, Any], vec0: float, threshold: float) -> str:
    if vec0 < threshold:
        return "rejected"
    if old.get("watermark_prob") is not None and old["watermark_prob"] >= old["watermark_threshold"]:
        return "rejected"
    return "accepted"


def test_rescore_writes_new_rows_beside_the_old(wh_settings: Settings, lake: dict) -> None:
    before = snapshot(wh_settings)
    model = StandIn()
    result = rescore(wh_settings, TWO_HOURS, model=model)
    eligible = [s for s in lake["scores"] if s.get("novelty_score") is not None]
    assert result.counts["rescored"] == len(eligible) > 10
    assert result.counts["not_at_novelty_stage"] == len(lake["scores"]) - len(eligible)
    vec0 = {e["sha256"]: e["embedding"][0] for e in lake["embeddings"]}
    with Warehouse.open(wh_settings, read_only=True) as wh:
        old_rows = wh.rows("SELECT * FROM scores WHERE novelty_model = 'knn-v1' ORDER BY candidate_id")
        new_rows = {r["candidate_id"]: r for r in wh.rows("SELECT * FROM scores WHERE novelty_model = ?",
                                                          [model.version])}
        dist = {r["model_version"]: r["scored"] for r in wh.rows("SELECT * FROM score_distribution")}
        mined = wh.rows("SELECT decision, model_version FROM mined_images")
    # the old rows are untouched; the pipeline's decisions (mined_images) still come from them
    assert old_rows == [r for r in before_rows(before) if r["novelty_model"] == "knn-v1"]
    assert {m["model_version"] for m in mined} <= {"knn-v1", None}
    assert dist == {"knn-v1": len(eligible), model.version: len(eligible)}
    for old in eligible:
        new = new_rows[old["candidate_id"]]
        assert new["novelty_score"] == pytest.approx(vec0[old["sha256"]], rel=1e-6)
        assert new["novelty_threshold"] == 0.5 and new["origin"] == "rescore"
        assert new["watermark_prob"] == old.get("watermark_prob")  # copied, not recomputed
        assert new["decision"] == _expected(old, vec0[old["sha256"]], 0.5), new["reason"]
        assert new["reason"].startswith(f"rescore (model {model.version}): ")
        if new["decision"] == "rejected" and vec0[old["sha256"]] < 0.5:
            assert "novelty: score" in new["reason"] and "< threshold 0.5000" in new["reason"]
    assert model.calls == 2  # one batch per hour, no per-image calls


def before_rows(snap: dict[str, list[tuple]]) -> list[dict[str, Any]]:
    from mining.warehouse import SCORE_COLUMNS

    cols = [*SCORE_COLUMNS, "interval_start", "origin"]
    return sorted((dict(zip(cols, r, strict=True)) for r in snap["scores"]), key=lambda r: r["candidate_id"])


def test_rescore_survives_reloads_and_is_idempotent(wh_settings: Settings, lake: dict) -> None:
    rescore(wh_settings, TWO_HOURS, model=StandIn())
    assert rescore_path(wh_settings, HOUR, "stand-in-v2").exists()
    assert read_partition(wh_settings.lake_dir, "scores", HOUR) is not None  # the pipeline's file is untouched
    first = snapshot(wh_settings)
    load_interval(wh_settings, TWO_HOURS)  # reload from the lake keeps the rescore rows
    assert snapshot(wh_settings) == first
    rescore(wh_settings, TWO_HOURS, model=StandIn())  # again: same rows (only scored_at moves)
    with Warehouse.open(wh_settings, read_only=True) as wh:
        counts = dict(wh.query("SELECT origin, count(*) FROM scores GROUP BY origin")[1])
        dupes = wh.query("SELECT count(*) FROM (SELECT candidate_id, novelty_model FROM scores GROUP BY ALL "
                         "HAVING count(*) > 1)")[1]
    assert counts["rescore"] == sum(1 for r in first["scores"] if r[-1] == "rescore")
    assert dupes == [(0,)]


def test_rescore_changes_and_latest_scores_views(wh_settings: Settings, lake: dict) -> None:
    rescore(wh_settings, TWO_HOURS, model=StandIn(threshold=0.5))
    with Warehouse.open(wh_settings, read_only=True) as wh:
        changes = wh.rows("SELECT * FROM rescore_changes")
        latest = Counter(r[0] for r in wh.query("SELECT novelty_model FROM latest_scores")[1])
    flipped = [s for s in lake["scores"] if s["decision"] == "accepted"
               and next(e for e in lake["embeddings"] if e["sha256"] == s["sha256"])["embedding"][0] < 0.5]
    assert flipped, "the synthetic data must contain images the stricter model rejects"
    assert {c["candidate_id"] for c in changes} >= {s["candidate_id"] for s in flipped}
    assert all(c["old_decision"] != c["new_decision"] for c in changes)
    assert latest["stand-in-v2"] == sum(1 for s in lake["scores"] if s.get("novelty_score") is not None)


def test_rescore_without_embeddings_or_scores_counts_instead_of_failing(wh_settings: Settings) -> None:
    write_hour(wh_settings, HOUR, with_scores=False)
    result = rescore(wh_settings, TWO_HOURS, model=StandIn())
    assert result.counts["hours_without_scores"] == 2
    assert result.counts.get("rescored", 0) == 0


def test_rescore_needs_an_active_model(wh_settings: Settings, lake: dict) -> None:
    with pytest.raises(RuntimeError, match="no active novelty model"):
        rescore(wh_settings, TWO_HOURS)


def test_rescore_with_a_real_fitted_novelty_model(wh_settings: Settings, lake: dict,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    novelty = pytest.importorskip("mining.novelty")
    rng = np.random.default_rng(0)
    liked = rng.normal(size=(40, 8)).astype(np.float32)
    liked[:, 0] += 2.0  # the person likes images with a large first component
    fitted = novelty.fit_and_select(liked, None, wh_settings, embedder="effnet@1", kinds=("knn",))
    novelty.save(wh_settings, fitted)
    novelty.activate(wh_settings, fitted.version)
    monkeypatch.setenv("MINING_HOME", str(wh_settings.home))
    assert main(["rescore", "--start", TWO_HOURS.start.isoformat(), "--end", TWO_HOURS.end.isoformat()]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == "rescore" and out["counts"]["rescored"] > 10
    with Warehouse.open(wh_settings, read_only=True) as wh:
        rows = wh.rows("SELECT novelty_score, novelty_threshold, decision FROM scores WHERE novelty_model = ?",
                       [fitted.version])
        version = wh.rows("SELECT kind, threshold FROM model_versions WHERE version = ?", [fitted.version])
        run = wh.rows("SELECT step FROM runs WHERE step = 'rescore'")
    assert len(rows) == out["counts"]["rescored"] and run
    assert version == [{"kind": "novelty", "threshold": pytest.approx(fitted.threshold)}]
    assert all(r["novelty_threshold"] == pytest.approx(fitted.threshold) for r in rows)
    assert any(r["decision"] == "rejected" for r in rows)
    # the scores are the model's own, for the stored vectors
    shas = [s["sha256"] for s in lake["scores"] if s.get("novelty_score") is not None]
    vec = {e["sha256"]: e["embedding"] for e in lake["embeddings"]}
    expected = sorted(fitted.score(np.asarray([vec[s] for s in shas], dtype=np.float32)).tolist())
    assert sorted(r["novelty_score"] for r in rows) == pytest.approx(expected, rel=1e-5)


def test_rescore_falls_back_to_the_warehouse_when_the_lake_was_pruned(wh_settings: Settings, lake: dict) -> None:
    import shutil

    for step in ("scores", "embeddings"):
        shutil.rmtree(wh_settings.lake_dir / step)
    result = rescore(wh_settings, TWO_HOURS, model=StandIn())
    eligible = [s for s in lake["scores"] if s.get("novelty_score") is not None]
    assert result.counts["hours_from_warehouse"] == 2
    assert result.counts["rescored"] == result.counts["rescores"] == len(eligible)
    assert rescore_path(wh_settings, HOUR, "stand-in-v2").exists()  # still recorded in the lake
    with Warehouse.open(wh_settings, read_only=True) as wh:
        assert wh.query("SELECT count(*) FROM scores WHERE novelty_model = 'stand-in-v2'")[1] == [(len(eligible),)]
