"""Secrets never appear in logs, Parquet or the warehouse.

A planted Reddit client secret drives a real pipeline interval (`mining run` against the
local replay with OAuth); then every file under MINING_HOME (Parquet, DuckDB, JSON, logs)
and the captured output are searched for it, raw and in the encodings it travels in.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from replay_world import mining, replay_world

from mining.lake import Interval

CLIENT_ID = "mining-secret-test-id"
SECRET = "PLANTED-s3cr3t-7f1c9a2e4b"


def _forms(secret: str) -> list[bytes]:
    basic = base64.b64encode(f"{CLIENT_ID}:{secret}".encode())
    return [secret.encode(), secret.encode("utf-16-le"), basic, base64.b64encode(secret.encode())]


@pytest.mark.slow
def test_planted_secret_never_reaches_files_or_logs(tmp_path: Path) -> None:
    home = tmp_path / "home"
    interval = Interval.hour_of(datetime.now(UTC) - timedelta(hours=2))
    with replay_world(home, [interval], oauth=True, client_id=CLIENT_ID, client_secret=SECRET) as world:
        out = [mining(["-v", "init", "--liked", str(world.liked_dir)], world.env)]
        out.append(mining(["-v", "run", "--start", interval.start.isoformat()], world.env))
        assert world.replay is not None and world.replay.tokens_issued >= 1  # the secret was really used
    captured = "".join(p.stdout + p.stderr for p in out).encode()
    assert b'"step": "publish"' in captured  # the run went all the way
    files = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files) and any(p.name == "warehouse.duckdb" for p in files)
    leaks = [str(p) for p in files for form in _forms(SECRET) if form in p.read_bytes()]
    leaks += [f"captured output ({form[:6]!r}...)" for form in _forms(SECRET) if form in captured]
    assert not leaks, f"secret found in: {leaks}"
