"""The DuckDB warehouse: migrations, idempotent per-interval loads, the single-writer lock,
the documented views, and ``mining sql``.

Lake partitions are written with pyarrow against mining.schemas, exactly as the steps write them.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from mining import schemas
from mining.cli import main
from mining.lake import Interval, write_partition
from mining.settings import Settings, load_settings
from mining.warehouse import (
    TABLES,
    VIEWS,
    ReadOnlyQueryError,
    Warehouse,
    WarehouseLockTimeout,
    check_read_only,
    load_interval,
    migrations,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HOUR = Interval.parse("2026-11-02T10:00")
SUBREDDITS = ("EarthPorn", "SkyPorn", "pics", "CityPorn")
MINED_IMAGES_COLUMNS = ["post_id", "subreddit", "title", "permalink", "image_url", "sha256", "decision", "reason",
                        "novelty_score", "novelty_threshold", "watermark_prob", "model_version", "interval_start",
                        "published_to"]


# ---------------------------------------------------------------------------------------
# a synthetic but realistic lake
# ---------------------------------------------------------------------------------------
def write_hour(settings: Settings, hour: Interval, n_posts: int = 12, seed: int = 0, model: str = "knn-v1",
               dim: int = 8, with_scores: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Write posts, coverage, candidates, embeddings and scores partitions for one hour; return the rows."""
    rng = np.random.default_rng(seed)
    t0 = hour.start
    tag = hour.start.strftime("%d%H")
    posts, cands, embs, scores = [], [], [], []
    for i in range(n_posts):
        pid = f"{tag}p{i:03d}"
        sub = SUBREDDITS[i % len(SUBREDDITS)]
        created = t0 + timedelta(minutes=int(rng.integers(0, 60)))
        gallery = i % 5 == 0
        posts.append(dict(post_id=pid, subreddit=sub, source="all" if i % 2 else sub, title=f"Title {pid} [OC]",
                          author=f"user{i}", permalink=f"https://www.reddit.com/r/{sub}/comments/{pid}/t/",
                          url=f"https://i.redd.it/{pid}.jpg", domain="i.redd.it", created_utc=created,
                          over_18=False, is_self=False, is_video=False, is_gallery=gallery, is_crosspost=False,
                          removed_by_category=None, score=int(rng.integers(1, 5000)),
                          num_comments=int(rng.integers(0, 300)), fetched_at=t0 + timedelta(minutes=61),
                          raw_json=json.dumps({"id": pid})))
        for pos in range(3 if gallery else 1):
            cid = f"{pid}:{pos}"
            roll = rng.random()
            status = ("downloaded" if roll < 0.75 else "failed:http_404" if roll < 0.85
                      else "skipped:too_small" if roll < 0.95 else "skipped:already_downloaded")
            sha = hashlib.sha256(f"{pid}:{pos}:{seed}".encode()).hexdigest() if status == "downloaded" else None
            cands.append(dict(candidate_id=cid, post_id=pid, subreddit=sub, position=pos,
                              kind="gallery" if gallery else "ireddit", url=f"https://i.redd.it/{pid}_{pos}.jpg",
                              known_width=2000, known_height=1500, status=status, sha256=sha,
                              path=f"images/{sha[:2]}/{sha[2:4]}/{sha}.jpg" if sha else None,
                              format="JPEG" if sha else None, width=2000 if sha else None,
                              height=1500 if sha else None, bytes=int(rng.integers(10**5, 10**7)) if sha else None,
                              http_status=200 if sha else 404, elapsed_s=float(rng.random()), interval_start=t0))
            score_row: dict[str, Any] = dict(candidate_id=cid, post_id=pid, sha256=sha, novelty_model=model,
                                             scored_at=t0 + timedelta(hours=1, minutes=5), interval_start=t0)
            if sha:
                vec = rng.normal(size=dim).astype(np.float32)
                embs.append(dict(sha256=sha, model="effnet@1", dim=dim, embedding=vec.tolist(), interval_start=t0))
                novelty = float(vec[0])
                wm = float(rng.random())
                score_row.update(novelty_score=novelty, novelty_threshold=0.0)
                if novelty < 0:
                    score_row.update(decision="rejected", stage="novelty",
                                     reason=f"novelty: score {novelty:.4f} < threshold 0.0000 (model {model})")
                elif wm >= 0.8:
                    score_row.update(watermark_model="wm@1", watermark_prob=wm, watermark_threshold=0.8,
                                     decision="rejected", stage="watermark",
                                     reason=f"watermark: probability {wm:.3f} >= threshold 0.800 (wm@1)")
                else:
                    score_row.update(watermark_model="wm@1", watermark_prob=wm, watermark_threshold=0.8,
                                     phash=f"{pos:016x}", decision="accepted", stage="accepted",
                                     reason=f"accepted: novelty {novelty:.4f} >= 0.0000")
            elif status.startswith("failed"):
                score_row.update(decision="failed", stage="download", reason="download: http_404")
            elif status.startswith("skipped:already"):
                score_row.update(decision="duplicate", stage="prefilter", reason="prefilter: already_downloaded")
            else:
                score_row.update(decision="rejected", stage="prefilter", reason="prefilter: too_small")
            scores.append(score_row)
    coverage = [dict(source=s, interval_start=t0, fetched_at=t0 + timedelta(minutes=61), collector="hourly",
                     pages=2, requests=2, posts_seen=150, posts_kept=n_posts, oldest_seen=t0, newest_seen=hour.end,
                     reached_boundary=True, gap=False, error=None) for s in ("all", "EarthPorn")]
    lake = settings.lake_dir
    write_partition(lake, "posts", hour, pa.Table.from_pylist(posts, schemas.POSTS))
    write_partition(lake, "coverage", hour, pa.Table.from_pylist(coverage, schemas.COVERAGE))
    write_partition(lake, "candidates", hour, pa.Table.from_pylist(cands, schemas.CANDIDATES))
    write_partition(lake, "embeddings", hour, pa.Table.from_pylist(embs, schemas.EMBEDDINGS))
    if with_scores:
        write_partition(lake, "scores", hour, pa.Table.from_pylist(scores, schemas.SCORES))
    return {"posts": posts, "candidates": cands, "embeddings": embs, "scores": scores}


def snapshot(settings: Settings) -> dict[str, list[tuple]]:
    with Warehouse.open(settings, read_only=True) as wh:
        return {t: wh.table_rows(t) for t in TABLES}


@pytest.fixture
def wh_settings(mining_home: Path) -> Settings:
    return load_settings(env={}, home=mining_home, watch_list=("EarthPorn", "SkyPorn"))


@pytest.fixture
def loaded(wh_settings: Settings) -> dict[str, list[dict[str, Any]]]:
    """Two hours written to the lake and loaded; returns the lake rows."""
    a = write_hour(wh_settings, HOUR, seed=1)
    b = write_hour(wh_settings, Interval(HOUR.end, HOUR.end + timedelta(hours=1)), seed=2)
    load_interval(wh_settings, Interval(HOUR.start, HOUR.end + timedelta(hours=1)))
    return {k: a[k] + b[k] for k in a}


# ---------------------------------------------------------------------------------------
# migrations
# ---------------------------------------------------------------------------------------
def test_migrations_apply_once_in_order_and_seed_the_watch_list(wh_settings: Settings) -> None:
    with Warehouse.open(wh_settings) as wh:
        assert wh.applied_migrations() == [m.version for m in migrations()]
        assert wh.migrate() == []  # idempotent
        names = {r[0] for r in wh.query("SELECT table_name FROM information_schema.tables")[1]}
        assert set(TABLES) | set(VIEWS) | {"schema_migrations"} <= names
        assert wh.watch_list() == ["EarthPorn", "SkyPorn"]
    before = snapshot(wh_settings)
    # Reopening (even with another configured watch list) re-seeds nothing and changes nothing.
    with Warehouse.open(wh_settings.replace(watch_list=("pics",))) as wh:
        assert wh.migrate() == []
        assert wh.watch_list() == ["EarthPorn", "SkyPorn"]
    assert snapshot(wh_settings) == before


def test_a_failing_migration_rolls_back_and_is_retried(wh_settings: Settings, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import mining.warehouse as warehouse

    sql_dir = tmp_path / "sql"
    sql_dir.mkdir()
    for m in migrations():
        (sql_dir / f"{m.version:03d}_{m.name}.sql").write_text(m.sql)
    (sql_dir / "900_broken.sql").write_text("CREATE TABLE half_done (x INT);\nSELECT * FROM no_such_table;\n")
    monkeypatch.setattr(warehouse, "SQL_DIR", sql_dir)
    with pytest.raises(Exception, match="no_such_table"), Warehouse.open(wh_settings):
        pass
    monkeypatch.setattr(warehouse, "SQL_DIR", PROJECT_ROOT / "mining" / "sql")
    with Warehouse.open(wh_settings) as wh:
        assert 900 not in wh.applied_migrations()
        assert wh.query("SELECT count(*) FROM information_schema.tables WHERE table_name = 'half_done'")[1] == [(0,)]


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------
def test_loading_twice_leaves_every_table_identical(wh_settings: Settings,
                                                   loaded: dict[str, list[dict[str, Any]]]) -> None:
    first = snapshot(wh_settings)
    assert len(first["posts"]) == len(loaded["posts"])
    assert len(first["candidates"]) == len(loaded["candidates"])
    assert len(first["scores"]) == len(loaded["scores"])
    assert len(first["embeddings"]) == len(loaded["embeddings"])
    assert len(first["coverage"]) == 4
    assert len(first["images"]) == len({c["sha256"] for c in loaded["candidates"] if c["sha256"]})
    result = load_interval(wh_settings, Interval(HOUR.start, HOUR.end + timedelta(hours=1)))
    assert result.counts["deleted_candidates"] == len(loaded["candidates"])
    assert snapshot(wh_settings) == first
    load_interval(wh_settings, HOUR)  # an overlapping single-hour reload
    assert snapshot(wh_settings) == first


def test_a_rerun_partition_replaces_the_hours_rows(wh_settings: Settings,
                                                  loaded: dict[str, list[dict[str, Any]]]) -> None:
    write_hour(wh_settings, HOUR, n_posts=4, seed=9)  # the step reran and wrote fewer rows
    load_interval(wh_settings, HOUR)
    with Warehouse.open(wh_settings, read_only=True) as wh:
        per_hour = dict(wh.query("SELECT interval_start, count(*) FROM posts GROUP BY ALL")[1])
        assert sorted(per_hour.values()) == [4, 12]
        dupes = wh.query("SELECT candidate_id FROM scores GROUP BY candidate_id, novelty_model HAVING count(*) > 1")
        assert dupes[1] == []
        orphans = wh.query("SELECT count(*) FROM candidates c ANTI JOIN posts p ON p.post_id = c.post_id")[1]
        assert orphans == [(0,)]


def test_missing_partitions_are_skipped_with_counts(wh_settings: Settings) -> None:
    write_hour(wh_settings, HOUR, with_scores=False)
    result = load_interval(wh_settings, Interval(HOUR.start, HOUR.end + timedelta(hours=2)))
    assert result.counts["hours_loaded"] == 1
    assert result.counts["hours_empty"] == 2
    assert result.counts["missing_scores"] == 3
    assert result.counts["missing_posts"] == 2
    with Warehouse.open(wh_settings, read_only=True) as wh:
        decisions = Counter(r[0] for r in wh.query("SELECT decision FROM mined_images")[1])
    assert set(decisions) <= {"pending", "failed", "rejected", "duplicate"} and decisions["pending"] > 0


def test_pipeline_step_and_cli_load(wh_settings: Settings, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    write_hour(wh_settings, HOUR)
    monkeypatch.setenv("MINING_HOME", str(wh_settings.home))
    assert main(["load", "--start", HOUR.start.isoformat()]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == "load" and out["counts"]["posts"] == 12
    with Warehouse.open(wh_settings, read_only=True) as wh:
        run = wh.rows("SELECT * FROM runs WHERE step = 'load'")
    assert len(run) == 1 and json.loads(run[0]["counts"])["posts"] == 12


# ---------------------------------------------------------------------------------------
# the single-writer lock
# ---------------------------------------------------------------------------------------
def _python(code: str, home: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "MINING_HOME": str(home), "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_loading_different_intervals_both_succeed(wh_settings: Settings) -> None:
    hours = [Interval(HOUR.start + timedelta(hours=i), HOUR.start + timedelta(hours=i + 1)) for i in range(4)]
    for i, h in enumerate(hours):
        write_hour(wh_settings, h, seed=i)
    code = """
        import sys
        from mining.lake import Interval
        from mining.settings import load_settings
        from mining.warehouse import load_interval
        for _ in range(3):  # several transactions each, so the two processes really interleave
            print(load_interval(load_settings(), Interval.parse(sys.argv[1], sys.argv[2])).counts["posts"])
    """
    procs = []
    for pair in (hours[:2], hours[2:]):
        env = {**os.environ, "MINING_HOME": str(wh_settings.home), "PYTHONPATH": str(PROJECT_ROOT)}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), pair[0].start.isoformat(), pair[1].end.isoformat()],
            env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.split() == ["24", "24", "24"]
    with Warehouse.open(wh_settings, read_only=True) as wh:
        assert wh.query("SELECT count(DISTINCT interval_start), count(*) FROM posts")[1] == [(4, 48)]


def test_a_writer_waits_for_the_lock_instead_of_failing(wh_settings: Settings, tmp_path: Path) -> None:
    write_hour(wh_settings, HOUR)
    ready = tmp_path / "ready"
    holder = _python(f"""
        from pathlib import Path
        from mining import clock
        from mining.settings import load_settings
        from mining.warehouse import Warehouse
        with Warehouse.open(load_settings()) as wh:
            Path({str(ready)!r}).write_text("x")
            clock.sleep(1.5)
            wh.record_run("holder", "test", "hold")
    """, wh_settings.home)
    import time

    deadline = time.monotonic() + 60
    while not ready.exists():
        assert holder.poll() is None, holder.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    started = time.monotonic()
    waiter = _python(f"""
        from mining.lake import Interval
        from mining.settings import load_settings
        from mining.warehouse import load_interval
        print(load_interval(load_settings(), Interval.parse({HOUR.start.isoformat()!r})).counts["posts"])
    """, wh_settings.home)
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err
    assert out.strip() == "12"
    assert time.monotonic() - started > 0.5  # it really waited for the holder
    assert holder.wait(timeout=60) == 0


def test_lock_timeout_is_a_clear_error(wh_settings: Settings) -> None:
    with Warehouse.open(wh_settings):
        pass
    lock_path = wh_settings.warehouse_path.with_name("warehouse.duckdb.lock")
    fd = os.open(lock_path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: conflicts like another process
    try:
        with pytest.raises(WarehouseLockTimeout, match="warehouse is busy"), \
                Warehouse.open(wh_settings, timeout_s=2):
            pass
        with pytest.raises(WarehouseLockTimeout, match="shared"), Warehouse.open(wh_settings, read_only=True):
            pass
    finally:
        os.close(fd)
    with Warehouse.open(wh_settings, read_only=True) as wh:  # released: works again
        assert wh.watch_list()


def test_nested_opens_in_one_thread_reuse_the_connection(wh_settings: Settings) -> None:
    with Warehouse.open(wh_settings) as outer:
        with Warehouse.open(wh_settings, read_only=True) as inner:
            assert inner is outer
        with Warehouse.open(wh_settings) as inner:
            assert inner is outer
    with Warehouse.open(wh_settings, read_only=True), pytest.raises(RuntimeError, match="read-only"), \
            Warehouse.open(wh_settings):
        pass


# ---------------------------------------------------------------------------------------
# views and the README's questions
# ---------------------------------------------------------------------------------------
def test_mined_images_has_exactly_the_documented_columns(wh_settings: Settings, loaded: dict) -> None:
    with Warehouse.open(wh_settings, read_only=True) as wh:
        columns, rows = wh.query("SELECT * FROM mined_images")
    assert columns == MINED_IMAGES_COLUMNS
    assert len(rows) == len(loaded["candidates"])
    docs = (PROJECT_ROOT / "docs" / "warehouse.md").read_text()
    for column in MINED_IMAGES_COLUMNS:
        assert f"`{column}`" in docs


def test_mined_images_shows_where_an_image_was_published(wh_settings: Settings, loaded: dict) -> None:
    accepted = next(s for s in loaded["scores"] if s["decision"] == "accepted")
    with Warehouse.open(wh_settings) as wh:
        wh.record_publication(accepted["sha256"], "folder", "failed", error="disk full",
                              candidate_id=accepted["candidate_id"])
        assert wh.rows("SELECT published_to FROM mined_images WHERE published_to IS NOT NULL") == []
        wh.record_publication(accepted["sha256"], "folder", "published", location="/gallery/a.jpg",
                              candidate_id=accepted["candidate_id"])
        wh.record_publication(accepted["sha256"], "folder", "failed", error="late retry")  # never downgrades
        got = wh.rows("SELECT post_id, decision, published_to FROM mined_images WHERE published_to IS NOT NULL")
        pub = wh.publication(accepted["sha256"], "folder")
    assert got == [{"post_id": accepted["post_id"], "decision": "accepted", "published_to": "/gallery/a.jpg"}]
    assert pub is not None and pub["status"] == "published" and pub["attempts"] == 3 and pub["error"] is None


def test_readme_acceptance_rate_per_subreddit(wh_settings: Settings, loaded: dict) -> None:
    with Warehouse.open(wh_settings, read_only=True) as wh:
        got = {r["subreddit"]: r for r in wh.rows(
            "SELECT subreddit, posts, candidates, accepted, acceptance_rate FROM acceptance_by_subreddit "
            "ORDER BY acceptance_rate DESC")}
    sub_of = {c["candidate_id"]: c["subreddit"] for c in loaded["candidates"]}
    accepted = Counter(sub_of[s["candidate_id"]] for s in loaded["scores"] if s["decision"] == "accepted")
    total = Counter(c["subreddit"] for c in loaded["candidates"])
    posts = Counter(p["subreddit"] for p in loaded["posts"])
    assert set(got) == set(SUBREDDITS)
    for sub in SUBREDDITS:
        assert got[sub]["posts"] == posts[sub]
        assert got[sub]["candidates"] == total[sub]
        assert got[sub]["accepted"] == accepted[sub]
        assert got[sub]["acceptance_rate"] == pytest.approx(accepted[sub] / total[sub], abs=1e-4)


def test_readme_why_was_this_post_rejected(wh_settings: Settings, loaded: dict) -> None:
    rejected = next(s for s in loaded["scores"] if s["stage"] == "novelty")
    watermarked = next(s for s in loaded["scores"] if s["stage"] == "watermark")
    with Warehouse.open(wh_settings, read_only=True) as wh:
        for row, words in ((rejected, ("novelty", "threshold", "knn-v1")), (watermarked, ("watermark", "0.800"))):
            found = wh.rows("SELECT decision, reason, novelty_score, novelty_threshold, watermark_prob "
                            "FROM mined_images WHERE post_id = ?", [row["post_id"]])
            mine = [f for f in found if f["novelty_score"] == pytest.approx(row["novelty_score"])]
            assert mine and mine[0]["decision"] == "rejected"
            assert all(w in mine[0]["reason"] for w in words)


def test_readme_score_distribution_per_model_version(wh_settings: Settings, loaded: dict) -> None:
    with Warehouse.open(wh_settings, read_only=True) as wh:
        rows = wh.rows("SELECT * FROM score_distribution")
    scored = [s["novelty_score"] for s in loaded["scores"] if s.get("novelty_score") is not None]
    assert len(rows) == 1 and rows[0]["model_version"] == "knn-v1"
    assert rows[0]["scored"] == len(scored)
    assert rows[0]["median"] == pytest.approx(float(np.median(scored)), rel=1e-6)
    assert rows[0]["threshold"] == 0.0


def test_readme_example_queries_in_the_docs_run(wh_settings: Settings, loaded: dict) -> None:
    docs = (PROJECT_ROOT / "docs" / "warehouse.md").read_text()
    queries = [q.strip() for q in docs.split("```sql")[1:]]
    queries = [q.split("```")[0].strip().rstrip(";") for q in queries]
    assert len(queries) >= 5
    post_id = loaded["posts"][0]["post_id"]
    with Warehouse.open(wh_settings, read_only=True) as wh:
        for q in queries:
            wh.query(q.replace("'POST_ID'", f"'{post_id}'"))


# ---------------------------------------------------------------------------------------
# state helpers
# ---------------------------------------------------------------------------------------
def test_gallery_helpers(wh_settings: Settings) -> None:
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    with Warehouse.open(wh_settings) as wh:
        assert wh.gallery_embeddings("m") == ([], pytest.approx(np.zeros((0, 0))))
        added = wh.add_to_gallery([
            {"sha256": a, "path": "images/a.jpg", "phash": "0f", "phash_mirror": "f0", "embedding": np.ones(3),
             "embed_model": "m", "source": "liked"},
            {"sha256": b, "path": "images/b.jpg", "phash": "1f", "phash_mirror": "f1", "embedding": None,
             "embed_model": None, "source": "published", "post_id": "p1", "candidate_id": "p1:0"},
        ])
        assert added == 2
        # Re-adding keeps the row and fills the missing embedding.
        assert wh.add_to_gallery([{"sha256": b, "embedding": [0.0, 1.0, 0.0], "embed_model": "m",
                                   "source": "published"}]) == 0
        wh.add_to_gallery([{"sha256": c, "phash": "2f", "phash_mirror": "f2", "embedding": [1, 2, 3, 4],
                            "embed_model": "other", "source": "liked"}])
        shas, matrix = wh.gallery_embeddings("m")
        assert shas == [a, b] and matrix.shape == (2, 3) and matrix.dtype == np.float32
        assert wh.gallery_hashes()[1] == (b, "1f", "f1", "p1:0")
        assert wh.rows("SELECT source, post_id FROM gallery WHERE sha256 = ?", [b]) == [
            {"source": "published", "post_id": "p1"}]


def test_model_versions_runs_and_watch_list(wh_settings: Settings) -> None:
    with Warehouse.open(wh_settings) as wh:
        wh.upsert_model_version("knn-1", "novelty", {"k": 5}, 60, {"auroc": 0.95}, 0.41)
        wh.upsert_model_version("gmm-2", "novelty", {"n": 16}, 6000, {"auroc": 0.97}, -120.0)
        wh.set_active_model("novelty", "knn-1")
        wh.set_active_model("novelty", "gmm-2")
        assert [r["version"] for r in wh.rows("SELECT version FROM active_models")] == ["gmm-2"]
        assert wh.active_model("novelty")["threshold"] == -120.0
        with pytest.raises(KeyError):
            wh.set_active_model("novelty", "nope")
        with pytest.raises(ValueError, match="novelty model"):
            wh.set_active_model("watermark", "knn-1")
        wh.record_run("r1", "mining_hourly", "load", HOUR, 1.7e9, 1.7e9 + 3, "success", {"posts": 3},
                      durations={"load": 3.0}, rejection_reasons={"novelty": 2})
        wh.record_run("r1", "mining_hourly", "load", HOUR, 1.7e9, 1.7e9 + 4, "success", {"posts": 3})
        run = wh.rows("SELECT * FROM runs")
        assert len(run) == 1 and run[0]["attempts"] == 2 and run[0]["interval_start"].hour == 10
        wh.add_to_watch_list("r/AbandonedPorn", added_by="discovery", note="12 accepted")
        assert wh.set_watch_active("skyporn", False)
        assert wh.watch_list() == ["EarthPorn", "AbandonedPorn"]


# ---------------------------------------------------------------------------------------
# mining sql
# ---------------------------------------------------------------------------------------
@pytest.fixture
def sql(wh_settings: Settings, loaded: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv("MINING_HOME", str(wh_settings.home))

    def run(*args: str) -> tuple[int, str, str]:
        rc = main(["sql", *args])
        captured = capsys.readouterr()
        return rc, captured.out, captured.err

    return run


def test_sql_json_is_one_array_of_row_objects(sql) -> None:
    rc, out, _ = sql("--format", "json", "SELECT post_id, interval_start, [1.5, 2.0] AS v, NULL AS n, "
                     "'{\"a\": 1}'::JSON AS j FROM mined_images ORDER BY post_id LIMIT 2")
    assert rc == 0
    rows = json.loads(out)
    assert isinstance(rows, list) and len(rows) == 2
    assert rows[0]["interval_start"] == "2026-11-02T10:00:00Z"
    assert rows[0]["v"] == [1.5, 2.0] and rows[0]["n"] is None and rows[0]["j"] == {"a": 1}


def test_sql_csv_and_table(sql) -> None:
    rc, out, _ = sql("--format", "csv", "SELECT subreddit, accepted FROM acceptance_by_subreddit ORDER BY subreddit")
    assert rc == 0
    parsed = list(csv.reader(io.StringIO(out)))
    assert parsed[0] == ["subreddit", "accepted"] and [r[0] for r in parsed[1:]] == sorted(SUBREDDITS)
    rc, out, _ = sql("SELECT subreddit, candidates FROM acceptance_by_subreddit ORDER BY subreddit")
    lines = out.splitlines()
    assert rc == 0 and lines[0].split() == ["subreddit", "candidates"] and set(lines[1]) == {"-", " "}
    assert lines[-1] == "(4 rows)" and len({len(line) for line in lines[2:-1]}) == 1  # aligned


def test_sql_refuses_writes_with_a_clear_message(sql, wh_settings: Settings) -> None:
    before = snapshot(wh_settings)
    for statement in ("DELETE FROM posts", "DROP VIEW mined_images", "COPY posts TO '/tmp/x.csv'",
                      "ATTACH ':memory:' AS m", "SELECT 1; DELETE FROM posts",
                      "WITH x AS (SELECT 1) INSERT INTO watch_list SELECT 'a', now(), 'user', true, NULL"):
        rc, out, err = sql(statement)
        assert rc == 2 and out == "" and "mining sql" in err, statement
    assert snapshot(wh_settings) == before
    rc, _, err = sql("SELECT no_such_column FROM posts")
    assert rc == 1 and "no_such_column" in err


@pytest.mark.parametrize("statement", ["SELECT 1", "with a as (select 1) select * from a", "DESCRIBE posts",
                                       "SHOW TABLES", "SUMMARIZE posts", "PRAGMA table_info('posts')",
                                       "EXPLAIN SELECT * FROM mined_images"])
def test_read_only_statements_are_allowed(statement: str) -> None:
    check_read_only(statement)


def test_check_read_only_rejects_garbage() -> None:
    with pytest.raises(ReadOnlyQueryError, match="parse"):
        check_read_only("SELEC 1")


def test_sql_on_a_fresh_home_creates_an_empty_warehouse(mining_home: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MINING_HOME", str(mining_home))
    assert main(["sql", "--format", "json", "SELECT count(*) AS n FROM mined_images"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 0}]
