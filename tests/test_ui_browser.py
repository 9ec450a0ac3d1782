"""Browser tier: the Mining view inside Airflow's UI, rendered by headless Chromium (Debian's).

The data are real results: the real pipeline (`mining init`, `mining run`) mines a replayed
hour of Reddit built from real photographs; then `make airflow`'s script serves the UI and
Chromium opens the view. Screenshots go to test-artifacts/ (ui.png: the page inside Airflow's
UI, ui-page.png: the page alone) so people can look at them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image, ImageStat
from replay_world import airflow_local, mining, replay_world

from mining.lake import Interval

pytestmark = pytest.mark.browser
ARTIFACTS = Path(os.environ.get("MINING_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("no chromium: run .ci/browser-tier.sh (it installs Debian's chromium)")


def _browse(tmp: Path, url: str, *, screenshot: Path | None = None, wait_ms: int = 8000) -> str:
    profile = tmp / f"chromium-profile-{os.getpid()}"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--window-size=1400,1800", f"--virtual-time-budget={wait_ms}"]
    cmd += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    proc = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _not_blank(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 10_000, f"no screenshot at {path}"
    with Image.open(path) as im:
        stat = ImageStat.Stat(im.convert("L"))
        colours = im.convert("RGB").resize((200, 260)).getcolors(1 << 16) or []
    assert stat.stddev[0] > 10 and len(colours) > 200, f"screenshot {path} looks blank"


def test_mining_view_in_airflow_shows_real_results(tmp_path: Path) -> None:
    home = tmp_path / "home"
    interval = Interval.hour_of(datetime.now(UTC) - timedelta(hours=2))
    with replay_world(home, [interval]) as world:
        mining(["init", "--liked", str(world.liked_dir)], world.env)
        mining(["run", "--start", interval.start.isoformat()], world.env)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with airflow_local(tmp_path, home) as base:
        dom = _browse(tmp_path, f"{base}/mining/")
        thumbs = re.findall(r'src="thumb/([0-9a-f]{64})\.jpg"', dom)
        assert len(thumbs) >= 2, dom[:3000]
        for sha in thumbs:
            with urllib.request.urlopen(f"{base}/mining/thumb/{sha}.jpg", timeout=30) as resp:
                assert resp.status == 200 and resp.headers["Content-Type"] == "image/jpeg"
        for reason in ("novelty", "download: http_404", "prefilter: too_small"):
            assert reason in dom, f"{reason!r} missing from the page"
        assert "watermark" in dom
        filtered = _browse(tmp_path, f"{base}/mining/?stage=download")
        rejection_rows = re.search(r"<table id=\"?rejection-table\"?.*?</table>", filtered, re.S)
        assert rejection_rows and "download: http_404" in rejection_rows.group(0)
        assert "prefilter: too_small" not in rejection_rows.group(0)

        page_png = ARTIFACTS / "ui-page.png"
        _browse(tmp_path, f"{base}/mining/", screenshot=page_png)
        _not_blank(page_png)
        ui_png = ARTIFACTS / "ui.png"
        _browse(tmp_path, f"{base}/plugin/mining", screenshot=ui_png, wait_ms=20000)
        _not_blank(ui_png)
        nav = _browse(tmp_path, f"{base}/plugin/mining", wait_ms=20000)
        assert 'src="/mining/"' in nav or "/mining/" in nav, "the Mining view is not embedded in Airflow's UI"
