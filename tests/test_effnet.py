"""mining.effnet: torch-free checkpoint reading, BN folding and the ONNX graph (no torch here)."""

from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from mining import effnet
from mining.models import load_spec, source_member
from mining.settings import load_settings

LITE0 = [  # (kernel, stride, expand ratio, out channels) per block, from the published config
    (3, 1, 1, 16), (3, 2, 6, 24), (3, 1, 6, 24), (5, 2, 6, 40), (5, 1, 6, 40),
    (3, 2, 6, 80), (3, 1, 6, 80), (3, 1, 6, 80), (5, 1, 6, 112), (5, 1, 6, 112), (5, 1, 6, 112),
    (5, 2, 6, 192), (5, 1, 6, 192), (5, 1, 6, 192), (5, 1, 6, 192), (3, 1, 6, 320),
]


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    settings = load_settings(env={}, models_dir=tmp_path_factory.mktemp("models"))
    return source_member(settings, load_spec(settings, "efficientnet-lite0"))


@pytest.fixture(scope="module")
def weights(checkpoint_bytes: bytes) -> dict[str, np.ndarray]:
    had_torch = "torch" in sys.modules  # True only when the torch tier shares this process
    out = effnet.read_checkpoint(checkpoint_bytes)
    assert had_torch or "torch" not in sys.modules, "reading a checkpoint must not import torch"
    return out


def test_reads_legacy_checkpoint_without_torch(weights: dict[str, np.ndarray]) -> None:
    assert len(weights) == 296
    assert weights["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert weights["_conv_stem.weight"].dtype == np.float32
    assert weights["_fc.weight"].shape == (1000, 1280)
    assert weights["_bn0.num_batches_tracked"].dtype == np.int64
    assert np.isfinite(weights["_conv_head.weight"]).all()
    assert (weights["_bn1.running_var"] > 0).all()


def test_architecture_is_derived_from_the_checkpoint(weights: dict[str, np.ndarray]) -> None:
    arch = effnet.derive_architecture(weights)
    assert (arch.stem_ch, arch.head_ch, arch.num_classes) == (32, 1280, 1000)
    got = [(b.kernel, b.stride, b.expanded // b.in_ch, b.out_ch) for b in arch.blocks]
    assert got == LITE0
    assert [b.skip for b in arch.blocks].count(True) == 9


def test_architecture_rejects_squeeze_excitation(weights: dict[str, np.ndarray]) -> None:
    w = dict(weights)
    w["_blocks.1._se_reduce.weight"] = np.zeros((4, 96, 1, 1), np.float32)
    with pytest.raises(effnet.CheckpointError, match="squeeze"):
        effnet.derive_architecture(w)


def test_fold_bn_equals_conv_then_batchnorm() -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    bn = {"bn.weight": rng.uniform(0.5, 2, 4), "bn.bias": rng.normal(size=4),
          "bn.running_mean": rng.normal(size=4), "bn.running_var": rng.uniform(0.1, 3, 4)}
    x = rng.normal(size=(3, 10)).astype(np.float32)  # 3 channels, 10 positions
    conv = w[:, :, 0, 0] @ x
    expected = ((conv - bn["bn.running_mean"][:, None]) / np.sqrt(bn["bn.running_var"][:, None] + 1e-3)
                * bn["bn.weight"][:, None] + bn["bn.bias"][:, None])
    fw, fb = effnet.fold_bn(w, bn, "bn")
    assert np.allclose(fw[:, :, 0, 0] @ x + fb[:, None], expected, atol=1e-5)


def test_onnx_graph_dynamic_batch_and_any_size(checkpoint_bytes: bytes) -> None:
    sess = ort.InferenceSession(effnet.convert(checkpoint_bytes), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["features", "logits"]
    x = np.random.default_rng(2).uniform(-1, 1, (3, 3, 224, 224)).astype(np.float32)
    feats, logits = sess.run(None, {"input": x})
    assert feats.shape == (3, 1280) and logits.shape == (3, 1000)
    assert (feats >= 0).all() and (feats <= 6).all()  # pooled ReLU6 activations
    one = sess.run(["features"], {"input": x[:1]})[0]
    assert np.allclose(one, feats[:1], atol=1e-5)  # batching does not change results
    other = sess.run(["features"], {"input": np.zeros((1, 3, 256, 320), np.float32)})[0]
    assert other.shape == (1, 1280)


def test_convert_is_deterministic(checkpoint_bytes: bytes, tmp_path: Path) -> None:
    a = effnet.convert(checkpoint_bytes, tmp_path / "a.onnx", metadata={"name": "x"})
    b = effnet.convert(checkpoint_bytes, with_logits=False)
    assert (tmp_path / "a.onnx").read_bytes() == a
    assert effnet.convert(checkpoint_bytes, metadata={"name": "x"}) == a
    assert len(b) < len(a)  # no classifier weights


# ---- synthetic checkpoints: the zip format and the restricted unpickler ------------------

class _FakeStorage:
    def __init__(self, key: str, data: np.ndarray) -> None:
        self.key, self.data = key, data


class _FakeTensor:
    def __init__(self, storage: _FakeStorage, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce__(self):  # type: ignore[no-untyped-def]
        stride = tuple(int(np.prod(self.shape[i + 1:])) for i in range(len(self.shape)))
        return (sys.modules["torch._utils"]._rebuild_tensor_v2,
                (self.storage, 0, self.shape, stride, False, collections.OrderedDict()))


@pytest.fixture
def fake_torch(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Just enough module names for pickle to write torch-style globals (no torch installed)."""
    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # type: ignore[no-untyped-def]
        raise AssertionError("never called when writing")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2  # type: ignore[attr-defined]
    float_storage = type("FloatStorage", (), {"__module__": "torch"})
    torch_mod.FloatStorage = float_storage  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", torch_mod)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)
    yield


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):  # type: ignore[no-untyped-def]
        if isinstance(obj, _FakeStorage):
            return ("storage", sys.modules["torch"].FloatStorage, obj.key, "cpu", obj.data.size)
        return None


def _state(arrays: dict[str, np.ndarray]) -> tuple[collections.OrderedDict, list[_FakeStorage]]:
    storages = [_FakeStorage(str(i), a.astype(np.float32).ravel()) for i, a in enumerate(arrays.values())]
    state = collections.OrderedDict((k, _FakeTensor(s, a.shape)) for (k, a), s in zip(arrays.items(), storages,
                                                                                          strict=True))
    return state, storages


def test_zip_format_checkpoint(fake_torch: None) -> None:
    arrays = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b.bias": np.array([1.5, -2.0])}
    state, storages = _state(arrays)
    pkl = io.BytesIO()
    _Pickler(pkl, protocol=2).dump(state)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pkl.getvalue())
        for s in storages:
            zf.writestr(f"archive/data/{s.key}", s.data.tobytes())
    got = effnet.read_checkpoint(buf.getvalue())
    assert set(got) == set(arrays)
    for k, a in arrays.items():
        assert np.array_equal(got[k], a.astype(np.float32))


def test_legacy_format_checkpoint(fake_torch: None) -> None:
    arrays = {"w": np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)}
    state, storages = _state(arrays)
    out = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(header, out, protocol=2)
    _Pickler(out, protocol=2).dump(state)
    pickle.dump([s.key for s in storages], out, protocol=2)
    for s in storages:
        out.write(struct.pack("<q", s.data.size) + s.data.tobytes())
    got = effnet.read_checkpoint(out.getvalue())
    assert np.array_equal(got["w"], arrays["w"])


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return (os.system, ("touch /tmp/mining-effnet-pwned",))


def test_unpickler_refuses_arbitrary_globals(tmp_path: Path) -> None:
    out = io.BytesIO()
    for header in (1, 1001, {}):
        pickle.dump(header, out, protocol=2)
    pickle.dump(collections.OrderedDict(x=_Evil()), out, protocol=2)
    marker = Path("/tmp/mining-effnet-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(effnet.CheckpointError, match=r"system"):
        effnet.read_checkpoint(out.getvalue())
    assert not marker.exists()
