"""mining.embed: batched, overlapped embedding; any width; the embed step over the lake."""

from __future__ import annotations

import hashlib
import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from mining import schemas
from mining.cli import main
from mining.devserver import DevServer, Response
from mining.embed import Embedder, embed_interval, embed_paths, load_embedder
from mining.lake import Interval, read_partition, write_partition
from mining.models import build, load_spec
from mining.settings import Settings

HOUR = Interval.parse("2026-11-20T10:00:00Z")


def tiny_clip_onnx(dim: int | str = 512, batch: int | str = "batch", seed: int = 0) -> bytes:
    """A stand-in for CLIP's visual tower: same input/output names, [N,3,224,224] -> [N,dim]."""
    from onnx import TensorProto, helper, numpy_helper

    width = 7 if isinstance(dim, str) else dim
    w = np.random.default_rng(seed).normal(size=(3, width)).astype(np.float32)
    b = np.random.default_rng(seed + 1).normal(size=(width,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["pixel_values"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "w"], ["mm"]),
         helper.make_node("Add", ["mm", "b"], ["image_embeds"])],
        "tiny_clip",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [batch, 3, 224, 224])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, [batch, dim])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture
def msettings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.replace(models_dir=tmp_path / "models", embed_batch_size=4, intra_op_threads=1)


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, colour in (("red", (220, 20, 20)), ("green", (20, 200, 30)), ("blue", (10, 20, 230)),
                         ("red2", (215, 25, 15))):
        path = tmp_path / f"{name}.jpg"
        Image.new("RGB", (320, 240), colour).save(path, quality=95)
        out[name] = path
    png = tmp_path / "logo.png"
    Image.new("RGBA", (300, 300), (0, 0, 0, 0)).save(png)
    out["logo"] = png
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated garbage")
    out["broken"] = bad
    return out


def _serve_cut(dev_server: DevServer, path: str, data: bytes, cut: int) -> None:
    calls = {"n": 0}

    def handler(req):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        start = int(req.headers["range"].split("=")[1].rstrip("-")) if "range" in req.headers else 0
        body = data[start:]
        headers = {"Content-Length": str(len(body))}
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if calls["n"] == 1:
            return Response(status, iter([body[:cut]]), headers)
        return Response(status, body, headers)

    dev_server.route(path, handler)


@pytest.fixture
def clip_settings(msettings: Settings, dev_server: DevServer, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The committed clip-vit-b16 spec, pulled from the local server through the CLI."""
    data = tiny_clip_onnx(512)
    _serve_cut(dev_server, "/Xenova/clip/vision_model.onnx", data, cut=len(data) // 3)
    monkeypatch.setenv("MINING_MODELS_DIR", str(msettings.models_dir))
    monkeypatch.setenv("MINING_HOME", str(msettings.home))
    rc = main(["models", "pull", "clip-vit-b16", "--url", f"{dev_server.url}/Xenova/clip/vision_model.onnx",
               "--sha256", hashlib.sha256(data).hexdigest()])
    assert rc == 0
    assert len(dev_server.requests_to("/Xenova/")) == 2  # cut once, resumed once
    return msettings.replace(embedder="clip-vit-b16")


def test_clip_shaped_model_embeds_at_its_own_width(clip_settings: Settings, images: dict[str, Path]) -> None:
    emb = load_embedder(clip_settings)
    assert (emb.name, emb.version, emb.model_id, emb.dim) == ("clip-vit-b16", "1", "clip-vit-b16@1", 512)
    order = ["red", "broken", "green", "blue", "red2", "logo"]
    res = emb.embed_paths([images[k] for k in order])
    assert res.vectors.shape == (6, 512) and res.vectors.dtype == np.float32
    assert res.ok.tolist() == [True, False, True, True, True, True]
    assert res.errors[1] and "broken" not in (res.errors[0] or "")
    assert np.allclose(np.linalg.norm(res.vectors[res.ok], axis=1), 1.0, atol=1e-5)
    assert not res.vectors[1].any()
    red, green, red2 = res.vectors[0], res.vectors[2], res.vectors[4]
    assert red @ red2 > red @ green  # similar colours, similar embeddings


def test_embed_arrays_is_batch_invariant(clip_settings: Settings) -> None:
    emb = load_embedder(clip_settings)
    x = np.random.default_rng(3).normal(size=(10, 3, 224, 224)).astype(np.float32)
    all_at_once = emb.embed_arrays(x)
    one_by_one = np.concatenate([emb.embed_arrays(x[i: i + 1]) for i in range(10)])
    assert all_at_once.shape == (10, 512)
    assert np.allclose(all_at_once, one_by_one, atol=1e-5)
    assert emb.embed_arrays(x[:0]).shape == (0, 512)


def _local_model(settings: Settings, name: str, data: bytes) -> None:
    md = Path(settings.models_dir)
    (md / "specs").mkdir(parents=True, exist_ok=True)
    (md / name).write_bytes(data)
    (md / "specs" / f"{name}.toml").write_text(
        f'name = "{name}"\nversion = "3"\nkind = "embedder"\nfile = "{name}"\ninput_name = "pixel_values"\n'
        '[preprocess]\nresize = 224\ncrop = 224\ninterpolation = "bicubic"\nscale = 0.0039215686\n'
        'mean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\n[source]\ntype = "pull"\n')


def test_dim_comes_from_a_run_when_the_shape_is_symbolic(msettings: Settings, images: dict[str, Path]) -> None:
    _local_model(msettings, "sym", tiny_clip_onnx(dim="d"))
    emb = load_embedder(msettings, "sym")
    assert emb.dim == 7
    assert embed_paths(msettings, [images["red"]], name="sym").vectors.shape == (1, 7)


def test_fixed_batch_model_is_padded(msettings: Settings, images: dict[str, Path]) -> None:
    _local_model(msettings, "fixed", tiny_clip_onnx(dim=16, batch=1))
    emb = load_embedder(msettings, "fixed")
    res = emb.embed_paths([images[k] for k in ("red", "green", "blue", "red2", "logo")])
    assert res.ok.all() and res.vectors.shape == (5, 16)


def test_decoding_runs_ahead_but_bounded(clip_settings: Settings, images: dict[str, Path]) -> None:
    emb = load_embedder(clip_settings)  # batch_size 4 -> at most 8 images decoded ahead
    lock = threading.Lock()
    started = {"n": 0}
    real = emb._decode

    def counting(src):  # type: ignore[no-untyped-def]
        with lock:
            started["n"] += 1
        return real(src)

    emb._decode = counting  # type: ignore[method-assign]
    sources = [images["red"]] * 40
    consumed = 0
    for batch in emb.iter_decoded(sources):
        assert len(batch) <= emb.batch_size
        assert started["n"] <= consumed + 3 * emb.batch_size
        consumed += len(batch)
    assert consumed == 40 and started["n"] == 40


def _candidates(settings: Settings, images: dict[str, Path]) -> None:
    rows = []
    store = settings.home / "images"
    for i, key in enumerate(["red", "red", "green", "broken", "blue"]):
        data = images[key].read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        rel = Path("images") / sha[:2] / sha[2:4] / f"{sha}.jpg"
        (settings.home / rel).parent.mkdir(parents=True, exist_ok=True)
        (settings.home / rel).write_bytes(data)
        rows.append({"candidate_id": f"p{i}:0", "post_id": f"p{i}", "subreddit": "EarthPorn", "position": 0,
                     "kind": "direct", "url": f"https://i.example/{key}.jpg", "status": "downloaded",
                     "sha256": sha, "path": str(rel), "format": "JPEG", "interval_start": HOUR.start})
    rows.append({"candidate_id": "p9:0", "post_id": "p9", "status": "skipped:nsfw", "interval_start": HOUR.start})
    assert store.is_dir()
    write_partition(settings.lake_dir, "candidates", HOUR, pa.Table.from_pylist(rows, schema=schemas.CANDIDATES))


def test_embed_interval_writes_one_row_per_distinct_image(clip_settings: Settings, images: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    _candidates(clip_settings, images)
    result = embed_interval(clip_settings, HOUR)
    assert result.counts == {"hours": 1, "candidates": 5, "images": 4, "embedded": 3, "reused": 0, "failed": 1}
    table = read_partition(clip_settings.lake_dir, "embeddings", HOUR)
    assert table is not None and table.schema == schemas.EMBEDDINGS
    assert table.num_rows == 3
    assert set(table.column("model").to_pylist()) == {"clip-vit-b16@1"}
    assert set(table.column("dim").to_pylist()) == {512}
    assert table.column("interval_start").to_pylist() == [datetime(2026, 11, 20, 10, tzinfo=UTC)] * 3
    first = table.to_pylist()
    # a rerun reuses the rows and writes the same partition
    again = embed_interval(clip_settings, HOUR)
    assert again.counts["reused"] == 3 and again.counts["embedded"] == 0
    assert read_partition(clip_settings.lake_dir, "embeddings", HOUR).to_pylist() == first
    # the CLI runs the same step
    monkeypatch.setenv("MINING_EMBEDDER", "clip-vit-b16")
    assert main(["embed", "--start", "2026-11-20T10:00:00Z"]) == 0
    assert '"reused": 3' in capsys.readouterr().out


def test_embed_interval_without_candidates_writes_nothing(msettings: Settings) -> None:
    result = embed_interval(msettings, HOUR)
    assert result.counts["hours"] == 0 and result.path is None


# ---- the real default embedder -----------------------------------------------------------

@pytest.fixture(scope="module")
def effnet(tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    from mining.settings import load_settings

    s = load_settings(env={}, models_dir=tmp_path_factory.mktemp("models"), embed_batch_size=8)
    path = build(s, "efficientnet-lite0")
    return Embedder(load_spec(s, "efficientnet-lite0"), path, batch_size=8)


@pytest.mark.shared
def test_effnet_embeds_photos_robustly(effnet: Embedder, shared_photos: Path, tmp_path: Path) -> None:
    photos = sorted((shared_photos / "scenery").glob("*.jpg"))[:6]
    # the same photo, smaller and re-encoded, must stay closer than any other photo
    small = tmp_path / "small.jpg"
    with Image.open(photos[0]) as im:
        im.convert("RGB").resize((im.width // 3, im.height // 3)).save(small, quality=70)
    res = effnet.embed_paths([*photos, small])
    assert res.ok.all() and res.vectors.shape == (7, 1280) and effnet.dim == 1280
    sims = res.vectors @ res.vectors[-1]
    assert sims[0] > 0.9
    assert sims[0] > sims[1:6].max()
