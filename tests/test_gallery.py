"""The publish step over a real lake and warehouse: exactly once, joined to the gallery, healed after a crash."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from mining import schemas
from mining.dedupe import hash_file
from mining.devserver import DevServer, Request, Response
from mining.gallery import publish_interval, store_image
from mining.lake import Interval, write_partition
from mining.settings import Settings
from mining.warehouse import Warehouse

HOUR = Interval.hour_of(datetime(2026, 11, 20, 10, 30, tzinfo=UTC))


def noise_jpeg(path: Path, seed: int, size: tuple[int, int] = (320, 240)) -> Path:
    """A photo-like image whose pHash differs from every other seed's."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)  # coarse structure drives the pHash
    Image.fromarray(small).resize(size, Image.BICUBIC).save(path, quality=92)
    return path


def lay_out_hour(settings: Settings, tmp_path: Path, decisions: list[str]) -> list[dict]:
    """Candidates, scores and embeddings partitions for HOUR: one image per decision, stored as the pipeline does."""
    cands, scores, embeds = [], [], []
    for i, decision in enumerate(decisions):
        src = noise_jpeg(tmp_path / f"src{i}.jpg", seed=i)
        sha = hashlib.sha256(src.read_bytes()).hexdigest()
        rel = store_image(settings, src, sha, "jpg")
        cid = f"p{i}:0"
        cands.append({"candidate_id": cid, "post_id": f"p{i}", "subreddit": "EarthPorn", "position": 0,
                      "kind": "ireddit", "url": f"https://i.redd.it/p{i}.jpg", "status": "downloaded",
                      "sha256": sha, "path": str(rel), "format": "JPEG", "width": 320, "height": 240,
                      "interval_start": HOUR.start})
        scores.append({"candidate_id": cid, "post_id": f"p{i}", "sha256": sha, "novelty_model": "knn-test",
                       "novelty_score": 0.5, "novelty_threshold": 0.3, "watermark_model": "wm-test",
                       "watermark_prob": 0.1, "watermark_threshold": 0.7, "decision": decision,
                       "stage": "final" if decision == "accepted" else "novelty",
                       "reason": f"{decision}: test", "scored_at": HOUR.end, "interval_start": HOUR.start})
        embeds.append({"sha256": sha, "model": "efficientnet-lite0@1", "dim": 4,
                       "embedding": [float(i), 1.0, 0.0, 0.0], "interval_start": HOUR.start})
    write_partition(settings.lake_dir, "candidates", HOUR, pa.Table.from_pylist(cands, schemas.CANDIDATES))
    write_partition(settings.lake_dir, "scores", HOUR, pa.Table.from_pylist(scores, schemas.SCORES))
    write_partition(settings.lake_dir, "embeddings", HOUR, pa.Table.from_pylist(embeds, schemas.EMBEDDINGS))
    return cands


def state(settings: Settings) -> dict:
    with Warehouse.open(settings, read_only=True) as wh:
        pubs = wh.rows("SELECT sha256, status, attempts FROM publications ORDER BY sha256")
        gallery = wh.rows("SELECT sha256, source, candidate_id, embedding IS NOT NULL AS has_embedding "
                          "FROM gallery ORDER BY sha256")
    files = sorted(p.name for p in settings.gallery_path.glob("*") if p.suffix != ".json") \
        if settings.gallery_path.exists() else []
    return {"publications": pubs, "gallery": gallery, "files": files}


def test_accepted_images_are_published_once_and_join_the_gallery(settings: Settings, tmp_path: Path) -> None:
    cands = lay_out_hour(settings, tmp_path, ["accepted", "rejected", "accepted"])
    result = publish_interval(settings, HOUR)
    assert result.counts == {"publish_published": 2}
    first = state(settings)
    accepted = sorted(cands[i]["sha256"] for i in (0, 2))
    assert [p["sha256"] for p in first["publications"]] == accepted
    assert all(p["status"] == "published" and p["attempts"] == 1 for p in first["publications"])
    assert [g["sha256"] for g in first["gallery"]] == accepted
    assert all(g["source"] == "published" and g["has_embedding"] for g in first["gallery"])
    assert len(first["files"]) == 2
    assert publish_interval(settings, HOUR).counts == {"already_published": 2}
    assert state(settings) == first


def test_a_publication_recorded_without_its_gallery_row_is_healed(settings: Settings, tmp_path: Path) -> None:
    """What a crash under an earlier version left behind: published, recorded, but not in the gallery."""
    lay_out_hour(settings, tmp_path, ["accepted", "accepted"])
    publish_interval(settings, HOUR)
    healthy = state(settings)
    with Warehouse.open(settings) as wh:
        wh.con.execute("DELETE FROM gallery")
    assert publish_interval(settings, HOUR).counts == {"already_published": 2, "gallery_repaired": 2}
    assert state(settings) == healthy


def test_dry_run_records_nothing_as_published(settings: Settings, tmp_path: Path) -> None:
    lay_out_hour(settings, tmp_path, ["accepted"])
    dry = settings.replace(dry_run=True)
    publish_interval(dry, HOUR)
    after = state(dry)
    assert after["files"] == [] and after["gallery"] == []
    assert all(p["status"] != "published" for p in after["publications"])
    assert publish_interval(settings, HOUR).counts == {"publish_published": 1}  # the real run still publishes


def test_a_near_copy_published_since_scoring_is_a_duplicate(settings: Settings, tmp_path: Path) -> None:
    cands = lay_out_hour(settings, tmp_path, ["accepted"])
    copy = tmp_path / "copy.jpg"
    with Image.open(settings.home / cands[0]["path"]) as im:
        im.resize((640, 480), Image.LANCZOS).save(copy, quality=80)  # a repost: bigger, recompressed
    phash, mirror = hash_file(copy, settings.phash_size)
    other_sha = hashlib.sha256(copy.read_bytes()).hexdigest()
    with Warehouse.open(settings) as wh:
        wh.add_to_gallery([{"sha256": other_sha, "path": str(copy), "phash": phash, "phash_mirror": mirror,
                            "source": "liked"}])
    assert publish_interval(settings, HOUR).counts == {"duplicate_at_publish": 1}
    (pub,) = state(settings)["publications"]
    assert pub["status"] == "duplicate"


def test_a_failed_publication_is_recorded_and_retried_next_run(settings: Settings, tmp_path: Path,
                                                             dev_server: DevServer) -> None:
    answers = iter([Response(503, b"busy", {"Content-Type": "text/plain"})])

    def gallery_import(req: Request) -> Response:
        return next(answers, None) or Response.json({"url": f"{dev_server.url}/images/1"}, status=201)

    dev_server.route("/api/import", gallery_import)
    http = settings.replace(publisher="http", publish_url=f"{dev_server.url}/api/import")
    cands = lay_out_hour(http, tmp_path, ["accepted"])
    assert publish_interval(http, HOUR).counts == {"publish_failed": 1}
    failed = state(http)
    assert failed["publications"][0]["status"] == "failed" and failed["gallery"] == []
    assert publish_interval(http, HOUR).counts == {"publish_published": 1}
    done = state(http)
    assert done["publications"] == [{"sha256": cands[0]["sha256"], "status": "published", "attempts": 2}]
    assert [g["sha256"] for g in done["gallery"]] == [cands[0]["sha256"]]
    assert len(dev_server.requests_to("/api/import")) == 2
    assert publish_interval(http, HOUR).counts == {"already_published": 1}
    assert len(dev_server.requests_to("/api/import")) == 2


@pytest.mark.parametrize("missing", ["scores", "nothing_accepted"])
def test_hours_without_accepted_images_publish_nothing(settings: Settings, tmp_path: Path, missing: str) -> None:
    if missing == "nothing_accepted":
        lay_out_hour(settings, tmp_path, ["rejected"])
    counts = publish_interval(settings, HOUR).counts
    assert counts == ({"hours_without_scores": 1} if missing == "scores" else {})
    assert state(settings)["publications"] == []
