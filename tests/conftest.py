"""Shared fixtures: a real local HTTP server, isolated MINING_HOME, a virtual clock.

Airflow reads its environment at import time, so AIRFLOW_HOME and friends are set here,
before any test module can import airflow.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="mining-airflow-"))
os.environ.setdefault("AIRFLOW_HOME", str(_AIRFLOW_HOME))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(Path(__file__).resolve().parents[1] / "dags"))
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "True")
os.environ.setdefault("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{_AIRFLOW_HOME / 'airflow.db'}")

from mining import clock  # noqa: E402
from mining.devserver import DevServer  # noqa: E402
from mining.settings import Settings, load_settings  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MINING_SHARED_DIR", PROJECT_ROOT.parent / "shared"))


class VirtualClock:
    """Real time plus every skipped sleep: sleeping costs nothing but still 'passes'."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.sleeps: list[float] = []
        self._mono, self._now = clock.monotonic, clock.now

    def monotonic(self) -> float:
        return self._mono() + self.offset

    def now(self) -> float:
        return self._now() + self.offset

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.sleeps.append(seconds)
            self.offset += seconds


@pytest.fixture(autouse=True)
def virtual_clock(monkeypatch: pytest.MonkeyPatch) -> VirtualClock:
    """Patch mining.clock so backoff and rate limits never really sleep in tests."""
    vc = VirtualClock()
    monkeypatch.setattr(clock, "monotonic", vc.monotonic)
    monkeypatch.setattr(clock, "now", vc.now)
    monkeypatch.setattr(clock, "sleep", vc.sleep)
    return vc


@pytest.fixture
def dev_server() -> Iterator[DevServer]:
    """A real HTTP server on 127.0.0.1 playing Reddit and image hosts."""
    with DevServer() as server:
        yield server


@pytest.fixture
def mining_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


@pytest.fixture
def settings(mining_home: Path, dev_server: DevServer) -> Settings:
    """Settings pointing at the local server, with loopback allowed for downloads."""
    return load_settings(
        env={},
        home=mining_home,
        reddit_base_url=dev_server.url,
        reddit_token_url=f"{dev_server.url}/api/v1/access_token",
        allowed_hosts=("127.0.0.1",),
        watch_list=("EarthPorn",),
        min_width=64,
        min_height=64,
    )


@pytest.fixture
def shared_dir() -> Path:
    """../shared, or a loud skip (a failure when MINING_REQUIRE_SHARED=1, as in .ci/run)."""
    if not (SHARED / "data").is_dir():
        msg = f"../shared not found at {SHARED}: shared-data tier skipped"
        if os.environ.get("MINING_REQUIRE_SHARED") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return SHARED


@pytest.fixture
def shared_photos(shared_dir: Path) -> Path:
    return shared_dir / "data" / "photos"


@pytest.fixture
def shared_reddit(shared_dir: Path) -> Path:
    return shared_dir / "data" / "reddit"


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    skipped = terminalreporter.stats.get("skipped", [])
    shared = [r for r in skipped if "shared" in str(getattr(r, "longrepr", ""))]
    if shared:
        terminalreporter.write_sep("!", f"{len(shared)} tests SKIPPED because ../shared is absent", yellow=True)
