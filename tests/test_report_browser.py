"""The HTML report renders in headless Chromium (Debian's package) with its charts and contact sheet."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_report import REPORT_WEEK, WATCHED, build_activity

from mining.discovery import propose
from mining.report import build_report
from mining.settings import load_settings

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


@pytest.fixture
def chromium(tmp_path: Path) -> list[str]:
    if not CHROMIUM.exists():
        msg = f"{CHROMIUM} missing: browser tier skipped (apt-get install -y chromium)"
        if os.environ.get("MINING_REQUIRE_BROWSER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    profile = tmp_path / "chromium-profile"
    return [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}"]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(cwd)}  # chromium writes its caches under HOME
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_report_renders_with_charts_and_contact_sheet(chromium: list[str], mining_home: Path,
                                                      tmp_path: Path) -> None:
    settings = load_settings(env={}, home=mining_home, watch_list=WATCHED)
    build_activity(settings)
    propose(settings, REPORT_WEEK)
    result = build_report(settings, REPORT_WEEK)
    html_path = Path(result.html_path)
    html = html_path.read_text()
    assert html.count("<svg") == 4 and 'id="contact-sheet"' in html

    shot = tmp_path / "report.png"
    proc = _run([*chromium, f"--screenshot={shot}", "--window-size=1280,2000", html_path.as_uri()], tmp_path)
    assert shot.is_file(), f"no screenshot: rc={proc.returncode} {proc.stderr[-2000:]}"
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert img.shape[:2] == (2000, 1280)
    assert img.std() > 20, "the screenshot is (nearly) blank"
    # the bar colours of the charts are on screen (accepted green, novelty blue)
    pixels = img.reshape(-1, 3)
    for colour in ((0x2E, 0x7D, 0x32), (0x15, 0x65, 0xC0)):
        assert (np.abs(pixels - colour).max(axis=1) < 8).sum() > 500, f"chart colour {colour} not rendered"

    dom = _run([*chromium, "--dump-dom", html_path.as_uri()], tmp_path).stdout
    assert dom.count("<svg") == 4 and dom.count("<rect") > 20
    assert 'id="contact-sheet"' in dom and "data:image/jpeg;base64," in dom
    # the contact sheet image decoded in the browser: its rendered size is in the layout
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", "<script>window.onload=()=>{const i=document.getElementById("
                                  "'contact-sheet');document.title='sheet:'+i.naturalWidth+'x'+i.naturalHeight;}"
                                  "</script></body>"))
    dom2 = _run([*chromium, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], tmp_path).stdout
    sheet = Image.open(result.contact_sheet_path)
    assert f"<title>sheet:{sheet.width}x{sheet.height}</title>" in dom2
