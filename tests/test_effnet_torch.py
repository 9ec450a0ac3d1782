"""Torch tier: the torch-free ONNX conversion matches an independent torch implementation.

The reference is the ``efficientnet-lite-pytorch`` package's EfficientNet-Lite0 (written
independently of mining.effnet) loaded with the same checkpoint through ``torch.load``.
Run with ``bash .ci/torch-tier.sh`` (creates .venv-torch with torch 2.13 CPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")

import onnxruntime as ort  # noqa: E402

from mining import effnet  # noqa: E402
from mining.models import load_spec, source_member  # noqa: E402
from mining.preprocess import load_for_model  # noqa: E402
from mining.settings import load_settings  # noqa: E402

pytestmark = pytest.mark.torch

# ImageNet classes 970-980 are natural formations (alp, bubble, cliff, coral reef, geyser,
# lakeside, promontory, sandbar, seashore, valley, volcano), plus scenic man-made classes
# that scenery photos commonly land on:
LANDSCAPE = set(range(970, 981)) | {437, 449, 460, 525, 536, 562, 580, 825, 888, 913}  # beacon, boathouse, breakwater, dam, dock, fountain, greenhouse, stone wall, viaduct, wreck


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    settings = load_settings(env={}, models_dir=tmp_path_factory.mktemp("models"))
    data = source_member(settings, load_spec(settings, "efficientnet-lite0"))
    path = tmp_path_factory.mktemp("ckpt") / "lite0.pth"
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint: Path):  # type: ignore[no-untyped-def]
    model = ref_pkg.EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return model


@pytest.fixture(scope="module")
def session(checkpoint: Path) -> ort.InferenceSession:
    return ort.InferenceSession(effnet.convert(checkpoint), providers=["CPUExecutionProvider"])


def _torch_outputs(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        t = torch.from_numpy(x)
        fmap = model.extract_features(t)
        feats = torch.nn.functional.adaptive_avg_pool2d(fmap, 1).flatten(1)
        logits = model(t)
    return feats.numpy(), logits.numpy()


def test_features_and_logits_match_reference_on_random_input(reference, session) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(3, 3, 224, 224)).astype(np.float32)
    t_feats, t_logits = _torch_outputs(reference, x)
    o_feats, o_logits = session.run(["features", "logits"], {"input": x})
    assert o_feats.shape == (3, 1280)
    assert np.abs(o_feats - t_feats).max() < 1e-4
    assert np.abs(o_logits - t_logits).max() < 1e-3


@pytest.mark.shared
def test_photos_match_reference_and_get_landscape_labels(reference, session, shared_photos: Path) -> None:  # type: ignore[no-untyped-def]
    spec = load_spec(load_settings(env={}), "efficientnet-lite0")
    paths = sorted((shared_photos / "scenery").glob("*.jpg"))[:24]
    assert paths, "no scenery photos"
    x = np.stack([load_for_model(p, spec) for p in paths])
    t_feats, t_logits = _torch_outputs(reference, x)
    o_feats, o_logits = session.run(["features", "logits"], {"input": x})
    assert np.abs(o_feats - t_feats).max() < 1e-4
    t_top5 = np.argsort(-t_logits, axis=1)[:, :5]
    o_top5 = np.argsort(-o_logits, axis=1)[:, :5]
    assert (t_top5[:, 0] == o_top5[:, 0]).all()
    # sanity: most scenery photos have a landscape class among their top-5 ImageNet labels
    hits = np.mean([bool(LANDSCAPE & set(row.tolist())) for row in o_top5])
    assert hits >= 0.6, f"only {hits:.0%} of scenery photos got a landscape label"
