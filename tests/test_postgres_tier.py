"""PostgreSQL + LocalExecutor: two hours of mining_hourly in parallel, same results as sequential.

Run by .ci/postgres-tier.sh, which starts Debian's PostgreSQL and sets MINING_TEST_PG_URL.
The hours come from a replayed Reddit built from real photographs (tests/replay_world.py);
the gallery and models are bootstrapped once (`mining init`) and copied, so the Airflow run
and the sequential `mining run` reference start from identical state.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from replay_world import BIN, airflow_local, decisions, mining, replay_world

from mining.lake import Interval

pytestmark = pytest.mark.postgres
LOCK_ERRORS = ("Could not set lock", "database is locked", "WarehouseLockTimeout")


@pytest.fixture
def pg_url() -> str:
    """A fresh, empty database on the tier's PostgreSQL (dropped afterwards)."""
    url = os.environ.get("MINING_TEST_PG_URL")
    if not url:
        pytest.fail("MINING_TEST_PG_URL is not set: run this tier with .ci/postgres-tier.sh")
    import psycopg2

    dsn = url.replace("postgresql+psycopg2://", "postgresql://")
    name = f"mining_tier_{uuid.uuid4().hex[:8]}"
    con = psycopg2.connect(dsn)
    con.autocommit = True
    con.cursor().execute(f"CREATE DATABASE {name}")
    yield url.rsplit("/", 1)[0] + "/" + name
    con.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    con.close()


def _runs(base: str) -> list[dict]:
    with urllib.request.urlopen(f"{base}/api/v2/dags/mining_hourly/dagRuns?limit=50", timeout=30) as resp:
        return json.load(resp)["dag_runs"]


def _only(rows: list[tuple], post_ids: set[str]) -> list[tuple]:
    return [r for r in rows if r[0] in post_ids]


def test_two_hours_in_parallel_match_sequential(tmp_path: Path, pg_url: str) -> None:
    now = datetime.now(UTC)
    hours = [Interval.hour_of(now - timedelta(hours=4)), Interval.hour_of(now - timedelta(hours=3))]
    parallel_home, sequential_home = tmp_path / "parallel", tmp_path / "sequential"
    with replay_world(parallel_home, hours) as world:
        mining(["init", "--liked", str(world.liked_dir)], world.env)
        shutil.copytree(parallel_home, sequential_home)
        seq_env = {**world.env, "MINING_HOME": str(sequential_home), "AIRFLOW_HOME": str(sequential_home / "airflow")}
        for hour in hours:
            mining(["run", "--start", hour.start.isoformat()], seq_env)

        af_env = {**world.env, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg_url,
                  "AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "AIRFLOW__CORE__PARALLELISM": "4"}
        env = {**os.environ, **af_env, "AIRFLOW_HOME": str(tmp_path / "airflow")}
        for key in ("AIRFLOW__CORE__UNIT_TEST_MODE",):
            env.pop(key, None)
        with airflow_local(tmp_path, parallel_home, af_env) as base:
            af = str(BIN / "airflow")
            unpaused = subprocess.run([af, "dags", "unpause", "mining_hourly"], env=env, capture_output=True, text=True)
            assert unpaused.returncode == 0, unpaused.stdout + unpaused.stderr
            created = subprocess.run(
                [af, "backfill", "create", "--dag-id", "mining_hourly", "--from-date", hours[0].start.isoformat(),
                 "--to-date", (hours[1].start + timedelta(minutes=30)).isoformat(), "--max-active-runs", "2"],
                env=env, capture_output=True, text=True)
            assert created.returncode == 0, created.stdout + created.stderr
            wanted = {h.start for h in hours}
            deadline = time.monotonic() + 900
            overlapped = False
            while True:
                runs = [r for r in _runs(base) if r.get("logical_date")
                        and datetime.fromisoformat(r["logical_date"].replace("Z", "+00:00")) in wanted]
                states = sorted(r["state"] for r in runs)
                overlapped |= states.count("running") >= 2
                if len(runs) == 2 and all(s in ("success", "failed") for s in states):
                    break
                assert time.monotonic() < deadline, f"backfill did not finish: {states}"
                time.sleep(5)
            assert states == ["success", "success"], f"runs ended {states}; logs under {tmp_path / 'airflow' / 'logs'}"
    logs = [p for p in (tmp_path / "airflow" / "logs").rglob("*") if p.is_file()]
    assert logs, "no task logs written"
    for path in logs:
        text = path.read_text(errors="replace")
        for marker in LOCK_ERRORS:
            assert marker not in text, f"{marker!r} in {path}"
    post_ids = set(world.expect)
    parallel, sequential = _only(decisions(parallel_home), post_ids), _only(decisions(sequential_home), post_ids)
    assert len(parallel) >= 40 and any(r[2] == "accepted" for r in parallel)
    assert parallel == sequential
    print(f"parallel runs overlapped: {overlapped}")
