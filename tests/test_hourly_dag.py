"""mining_hourly end to end under `airflow dags test`: reruns, overlapping backfills and a kill.

Real Airflow (a subprocess per run, its own metadata DB), the real pipeline and models, a
replayed Reddit hour built from real photographs on a local server. What must hold:
- rerunning an hour, or backfilling hours that overlap ones already run, leaves the gallery
  (files and table), the publications table and every decision exactly as they were;
- a run killed while publishing, then rerun, publishes nothing twice and ends in the state of
  an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from replay_world import BIN, CONFTEST_AIRFLOW_ENV, PROJECT_ROOT, decisions, mining, replay_world

from mining.demo import airflow_setup
from mining.devserver import Request, Response
from mining.lake import Interval

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def own_airflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest's in-process Airflow settings are not the subprocesses': each test's env names its own."""
    for key in CONFTEST_AIRFLOW_ENV:
        monkeypatch.delenv(key, raising=False)


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **extra}


def dags_test(env: dict[str, str], hour: Interval, log: Path, conf: dict | None = None) -> subprocess.Popen:
    """Start `airflow dags test mining_hourly` for ``hour`` (a manual run owns the hour ending at its date)."""
    cmd = [str(BIN / "airflow"), "dags", "test", "mining_hourly", hour.end.isoformat()]
    if conf:
        cmd += ["--conf", json.dumps(conf)]
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, env=_env(env), stdout=fh, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
                                start_new_session=True)


def run_hour(env: dict[str, str], hour: Interval, log: Path, conf: dict | None = None) -> None:
    """Run the hour to the end; the run's own state, from Airflow's metadata DB, must be success."""
    proc = dags_test(env, hour, log, conf)
    rc = proc.wait(timeout=900)
    text = log.read_text(errors="replace")
    assert rc == 0, f"dags test {hour} exited {rc}:\n{text[-5000:]}"
    listed = subprocess.run([str(BIN / "airflow"), "dags", "list-runs", "mining_hourly", "-o", "json"],
                            env=_env(env), capture_output=True, text=True, check=True)
    table = next(line for line in listed.stdout.splitlines() if line.startswith("["))  # warnings share stdout
    runs = [r for r in json.loads(table) if r["logical_date"]
            and datetime.fromisoformat(r["logical_date"].replace("Z", "+00:00")) == hour.end]
    assert runs and runs[0]["state"] == "success", f"{runs}\n{text[-5000:]}"


def snapshot(home: Path) -> dict:
    """Everything a rerun must leave unchanged (minus wall-clock timestamps)."""
    from mining.settings import load_settings
    from mining.warehouse import Warehouse

    settings = load_settings(env={"MINING_HOME": str(home)})
    gallery_dir = settings.gallery_path
    files = {str(p.relative_to(gallery_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(gallery_dir.rglob("*")) if p.is_file() and p.suffix != ".json"}
    with Warehouse.open(settings, read_only=True) as wh:
        _, pubs = wh.query("SELECT sha256, target, status, replace(location, ?, '<home>'), candidate_id, attempts "
                           "FROM publications ORDER BY ALL", [str(home)])
        _, gallery = wh.query("SELECT sha256, path, phash, phash_mirror, source, post_id, candidate_id, "
                              "embedding IS NOT NULL FROM gallery ORDER BY ALL")
    return {"files": files, "publications": pubs, "gallery": gallery, "decisions": decisions(home)}


def test_reruns_and_overlapping_backfills_change_nothing(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    hours = [Interval.hour_of(now - timedelta(hours=3)), Interval.hour_of(now - timedelta(hours=2))]
    home, log = tmp_path / "home", tmp_path / "dags-test.log"
    with replay_world(home, hours) as world:
        mining(["init", "--liked", str(world.liked_dir)], world.env)
        airflow_setup(world.env)
        liked = snapshot(home)

        run_hour(world.env, hours[0], log)
        first = snapshot(home)
        published = [p for p in first["publications"] if p[2] == "published"]
        assert published, "the hour published nothing: the test would prove nothing"
        assert len(first["files"]) == len(liked["files"]) + len(published)
        assert {p[0] for p in published} <= {g[0] for g in first["gallery"]}  # joined the gallery at once
        # A mixed hour, so reruns have every kind of decision to keep (which watermarked copies the
        # detector catches is its own tests' business, not this one's).
        reasons = " | ".join(d[3] or "" for d in first["decisions"] if d[2] == "rejected")
        assert "novelty" in reasons and "prefilter" in reasons, reasons
        assert {"accepted", "duplicate", "failed"} <= {d[2] for d in first["decisions"]}

        run_hour(world.env, hours[0], log)
        assert snapshot(home) == first, "rerunning the same hour changed the state"

        run_hour(world.env, hours[1], log)
        both = snapshot(home)
        assert both["publications"] != first["publications"]  # the second hour published its own images
        for hour in hours:  # a backfill of both hours, overlapping what already ran
            run_hour(world.env, hour, log)
        assert snapshot(home) == both, "an overlapping backfill changed the state"


def test_a_run_killed_while_publishing_publishes_nothing_twice(tmp_path: Path) -> None:
    """HTTP publisher: the gallery's import endpoint holds the second upload while the test kills the run.

    The first image's publication was committed; the second reached the gallery but its answer
    never did. The rerun must not post the first again, and re-sends the second with the same
    Idempotency-Key (the gallery's way to recognise a retry), so each image exists there once.
    """
    now = datetime.now(UTC)
    hour = Interval.hour_of(now - timedelta(hours=3))
    home, log = tmp_path / "home", tmp_path / "dags-test.log"
    received: list[tuple[str, str]] = []  # (idempotency key, sha256 of the uploaded bytes)
    second_arrived, release = threading.Event(), threading.Event()

    with replay_world(home, [hour]) as world:
        from test_publish import parse_multipart

        def gallery_import(req: Request) -> Response:
            fields = parse_multipart(req)
            received.append((req.headers["idempotency-key"], hashlib.sha256(fields["image"][1]).hexdigest()))
            if len({key for key, _ in received}) == 2 and not release.is_set():
                second_arrived.set()
                release.wait(60)  # the run is killed while it waits for this answer
            return Response.json({"id": received[-1][0][:12]}, status=201)

        assert world.server is not None
        world.server.route("/api/import", gallery_import)
        env = {**world.env, "MINING_PUBLISH_URL": f"{world.server.url}/api/import", "MINING_PUBLISH_SECRET": "s3cret"}
        mining(["init", "--liked", str(world.liked_dir)], env)
        airflow_setup(env)

        proc = dags_test(env, hour, log, conf={"publisher": "http"})
        try:
            while not second_arrived.wait(1):  # a run that dies first fails now, not after a timeout
                assert proc.poll() is None, f"the run ended before its second upload:\n{log.read_text()[-5000:]}"
            os.killpg(proc.pid, signal.SIGKILL)
            assert proc.wait(60) == -signal.SIGKILL
        finally:
            release.set()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        killed = snapshot(home)
        assert [p[2] for p in killed["publications"] if p[2] == "published"] == ["published"]

        run_hour(env, hour, log, conf={"publisher": "http"})
        after = snapshot(home)

    keys = [key for key, _ in received]
    assert all(key == sha for key, sha in received)  # the key is the image's sha256
    assert keys[0] != keys[1] and keys.count(keys[0]) == 1, f"the committed publication was posted again: {keys}"
    published = {p[0] for p in after["publications"] if p[2] == "published"}
    assert published == set(keys), "every upload the gallery holds is recorded as published, and only those"
    assert len(keys) == len(published) + 1  # only the unacknowledged upload was sent again
    assert all(p[5] == 1 for p in after["publications"])  # one attempt each: nothing retried twice
    assert published <= {g[0] for g in after["gallery"]}
    assert "s3cret" not in log.read_text()
