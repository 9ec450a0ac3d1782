"""`mining score PATH...`: the first thing a user tries; one JSON line per image, never a crash."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mining.cli import main


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    """Two small photo-like images, a note that is not an image, and a broken JPEG, in a folder."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "sub/b.png"):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((320, 240)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    return folder


def test_score_prints_a_line_per_image_and_an_error_line_for_broken_files(
        photo_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MINING_HOME", str(tmp_path / "home"))  # no taste model yet
    missing = tmp_path / "missing.jpg"
    assert main(["score", str(photo_folder), str(missing)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(x["path"]).name for x in lines] == ["a.jpg", "broken.jpg", "b.png", "missing.jpg"]
    good = [x for x in lines if "error" not in x]
    assert [Path(x["path"]).name for x in good] == ["a.jpg", "b.png"]
    for x in good:
        assert x["sha256"] == hashlib.sha256(Path(x["path"]).read_bytes()).hexdigest()
        assert x["embedding_model"].startswith("efficientnet-lite0@")
        assert x["watermark_prob"] is None or 0 <= x["watermark_prob"] <= 1  # None until a detector is trained
        assert "decision" not in x  # nothing to decide with before `mining init`
    assert all(x["error"] for x in lines if x not in good)


def test_score_without_paths_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MINING_HOME", str(tmp_path / "home"))
    assert main(["score"]) == 2
