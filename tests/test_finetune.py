"""The fine-tuned watermark CNN without torch: its ONNX export, runtime detector, selection, evaluation.

Training itself needs torch and is covered by tests/test_finetune_torch.py (the torch tier).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fake_photos import fake_photo, fake_photo_dir
from PIL import Image

from mining.finetune import (
    CELL,
    CNN_VERSION,
    CUT,
    FinetuneConfig,
    export_onnx,
    finetune,
    head_layers,
    pretrained_body,
    to_input,
    training_example,
    vary_photo,
    warm_layers,
)
from mining.lake import sha256_file
from mining.settings import Settings
from mining.watermark import CnnDetector, cnn_dir, evaluate, load_detector, save_head


@pytest.fixture(scope="module")
def cell_model() -> bytes:
    """The pretrained Lite0 body (from the embedder's wheel) with a freshly initialised cell head."""
    from mining.settings import load_settings

    stem, blocks = pretrained_body(load_settings(env={}))
    return export_onnx(stem, blocks, head_layers(np.random.default_rng(0)))


@pytest.fixture
def installed_cnn(settings: Settings, cell_model: bytes, tmp_path: Path) -> Settings:
    """Settings whose private models_dir holds a 'fine-tuned' CNN (untrained head) with a known threshold."""
    settings = settings.replace(models_dir=tmp_path / "models")
    meta = {"version": "wmcnn-test", "threshold": 0.4, "input_size": 512, "train_photos_sha256": []}
    CnnDetector.save(cnn_dir(settings), cell_model, meta)
    return settings


def test_export_scores_each_cell_and_takes_the_highest(cell_model: bytes) -> None:
    sess = ort.InferenceSession(cell_model, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).integers(0, 256, (2, 512, 512, 3), dtype=np.uint8)
    logit, cells = sess.run(None, {"input": to_input(x)})
    assert logit.shape == (2, 1) and cells.shape == (2, 1, 512 // CELL, 512 // CELL)
    np.testing.assert_allclose(logit[:, 0], cells.reshape(2, -1).max(axis=1))
    # Fully convolutional: any size works, the grid follows the input (TF SAME padding rounds up).
    _, cells = sess.run(None, {"input": to_input(x[:1, :200, :330])})
    assert cells.shape == (1, 1, 13, 21)


def test_export_with_top_k_pooling_takes_the_mean_of_the_highest_cells() -> None:
    from mining.settings import load_settings

    stem, blocks = pretrained_body(load_settings(env={}))
    head = head_layers(np.random.default_rng(0))
    sess = ort.InferenceSession(export_onnx(stem, blocks, head, pool_top=4), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).integers(0, 256, (3, 128, 160, 3), dtype=np.uint8)
    logit, cells = sess.run(None, {"input": to_input(x)})
    top4 = np.sort(cells.reshape(3, -1), axis=1)[:, -4:].mean(axis=1)
    assert logit.shape == (3, 1)
    np.testing.assert_allclose(logit[:, 0], top4, rtol=1e-6)
    assert not np.allclose(logit[:, 0], cells.reshape(3, -1).max(axis=1))  # not the maximum after all


def test_body_is_the_embedders_first_blocks() -> None:
    from mining.settings import load_settings

    stem, blocks = pretrained_body(load_settings(env={}))
    assert stem.w.shape[:2] == (32, 3) and [b.index for b in blocks] == list(range(CUT))
    assert blocks[-1].convs[-1].w.shape[0] == 112  # the head's input width


def test_warm_start_takes_every_weight_of_a_previous_model_and_refuses_others(cell_model: bytes) -> None:
    from mining.settings import load_settings

    stem, blocks = pretrained_body(load_settings(env={}))
    tag = {"cnn_version": CNN_VERSION}
    previous = export_onnx(stem, blocks, head_layers(np.random.default_rng(7)), metadata=tag)
    fresh = (stem, blocks, head_layers(np.random.default_rng(8)))
    assert export_onnx(*fresh, metadata=tag) != previous
    assert export_onnx(*warm_layers(previous, *fresh), metadata=tag) == previous
    with pytest.raises(ValueError, match="not " + CNN_VERSION):
        warm_layers(cell_model, *fresh)  # no architecture tag: not one of ours


def test_training_example_cover_marks_watermarked_cells_only() -> None:
    rng = np.random.default_rng(3)
    base = fake_photo(rng, 800, 600)
    seen = set()
    for _ in range(12):
        x, cover, label = training_example(base, rng, 256)
        assert x.shape == (256, 256, 3) and x.dtype == np.uint8 and cover.shape == (16, 16)
        assert (cover.max() > 0) == bool(label), "a clean example has no ink; a marked one has some"
        assert 0 <= cover.min() and cover.max() <= 1
        seen.add(label)
    assert seen == {0, 1}


def test_scene_text_examples_keep_a_cover_of_the_mark_alone() -> None:
    """Scene text is a clean feature: a clean example with a sign has no ink cells; a marked one has."""
    rng = np.random.default_rng(5)
    base = fake_photo(rng, 800, 600)
    plain = np.asarray(base.resize((256, 256), Image.BILINEAR), dtype=np.int16)
    seen = set()
    for _ in range(12):
        x, cover, label = training_example(base, rng, 256, scene_text=1.0)
        assert (cover.max() > 0) == bool(label)
        if not label:  # the sign is there all the same (mirrored or not)
            assert min(np.abs(x.astype(np.int16) - plain).max(), np.abs(x[:, ::-1] - plain).max()) > 60
        seen.add(label)
    assert seen == {0, 1}


def test_varied_photos_are_crops_of_the_photo_and_keep_the_mark_alone_in_the_cover() -> None:
    rng = np.random.default_rng(7)
    base = fake_photo(rng, 800, 600)
    sizes = set()
    for _ in range(20):
        view = vary_photo(base, rng)
        assert 16 <= view.width <= 800 and 16 <= view.height <= 600
        assert view.width * view.height >= 0.3 * 800 * 600 * 0.99, "at least 30% of the photo"
        sizes.add(view.size)
    assert len(sizes) > 10, "every view is a different crop"
    seen = set()
    for _ in range(12):
        x, cover, label = training_example(base, rng, 256, photo_aug=1.0)
        assert x.shape == (256, 256, 3) and (cover.max() > 0) == bool(label)
        seen.add(label)
    assert seen == {0, 1}


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        FinetuneConfig(size=500)
    with pytest.raises(ValueError, match="positive"):
        FinetuneConfig(steps=0)
    with pytest.raises(ValueError, match="calibration"):
        FinetuneConfig(calibration=0)
    with pytest.raises(ValueError, match="scene_text"):
        FinetuneConfig(scene_text=1.5)
    with pytest.raises(ValueError, match="pool_top"):
        FinetuneConfig(pool_top=0)
    with pytest.raises(ValueError, match="photo_aug"):
        FinetuneConfig(photo_aug=-0.1)
    with pytest.raises(ValueError, match="rank_weight"):
        FinetuneConfig(rank_weight=-1)
    with pytest.raises(ValueError, match="frozen"):
        FinetuneConfig(frozen=12)  # the body has 11 blocks
    with pytest.raises(ValueError, match="pool_top"):
        FinetuneConfig(size=64, pool_top=17)  # a 4x4 grid has 16 cells
    with pytest.raises(ValueError, match="max_fpr"):
        FinetuneConfig(target_fpr=0.08)  # an aim looser than the promise


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed here")
def test_finetune_without_torch_says_how_to_get_it(settings: Settings, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from mining.cli import main

    photos = fake_photo_dir(tmp_path / "clean", 3)
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[finetune\]'"):
        finetune(settings, photos)
    assert main(["watermark", "finetune", "--clean", str(photos), "--out", str(tmp_path / "cnn")]) == 1
    assert "needs torch: pip install" in capsys.readouterr().err and not (tmp_path / "cnn").exists()


def test_cnn_detector_loads_with_its_threshold_and_reads_files(installed_cnn: Settings, tmp_path: Path) -> None:
    det = load_detector(installed_cnn)
    assert isinstance(det, CnnDetector)
    assert det.threshold == 0.4 and det.version == "wmcnn-test" and det.decode_size == 512
    fake_photo(np.random.default_rng(0)).save(tmp_path / "a.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"nope")
    probs = det.predict_paths([tmp_path / "a.jpg", tmp_path / "broken.jpg"])
    assert 0 <= probs[0] <= 1 and np.isnan(probs[1])
    assert load_detector(installed_cnn.replace(watermark_threshold=0.9)).threshold == 0.9


def test_selection_prefers_the_cnn_and_can_name_either(installed_cnn: Settings) -> None:
    from mining.watermark import Head, detector_dir

    assert isinstance(load_detector(installed_cnn.replace(watermark_model="watermark-cnn")), CnnDetector)
    assert load_detector(installed_cnn.replace(watermark_model="watermark-text")) is None  # none trained
    head = Head(mean=np.zeros(3), scale=np.ones(3), weights=[np.zeros((3, 1))], biases=[np.zeros(1)])
    save_head(detector_dir(installed_cnn), head, {"version": "wm-x", "threshold": 0.5, "feature_version": "old"})
    # The text head on disk is stale (wrong feature version): refused, so the CNN still serves the default.
    assert isinstance(load_detector(installed_cnn), CnnDetector)
    for f in cnn_dir(installed_cnn).iterdir():
        f.unlink()
    assert load_detector(installed_cnn.replace(watermark_model="watermark-cnn")) is None


def test_evaluate_skips_the_photos_the_cnn_trained_and_calibrated_on(installed_cnn: Settings,
                                                                     cell_model: bytes, tmp_path: Path) -> None:
    clean = fake_photo_dir(tmp_path / "clean", 4, seed=5)
    seen = [sha256_file(clean / "p0.jpg"), sha256_file(clean / "p1.jpg")]
    meta = json.loads((cnn_dir(installed_cnn) / "meta.json").read_text())
    CnnDetector.save(cnn_dir(installed_cnn), cell_model, {**meta, "train_photos_sha256": seen})
    report = evaluate(installed_cnn, clean, n_per_image=2, neg_per_image=1)
    assert report.excluded_training_photos == 2 and report.photos == 2 and report.samples == 6
    assert report.detector == "wmcnn-test" and report.threshold == 0.4


def _weights(model: bytes) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load_from_string(model).graph.initializer}


def test_soup_weights_average_every_float_weight_and_refuse_another_graph() -> None:
    from mining.finetune import soup_weights
    from mining.settings import load_settings

    stem, blocks = pretrained_body(load_settings(env={}))
    a, b = (export_onnx(stem, blocks, head_layers(np.random.default_rng(s))) for s in (1, 2))
    mixed, wa, wb = _weights(soup_weights([a, b])), _weights(a), _weights(b)
    assert mixed.keys() == wa.keys()
    changed = [k for k in wa if not np.array_equal(wa[k], wb[k])]
    assert changed  # the two heads differ ...
    for k in wa:  # ... and the soup holds their mean, the shared body unchanged
        np.testing.assert_allclose(mixed[k], (wa[k].astype(np.float64) + wb[k]) / 2, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="another graph"):
        soup_weights([a, export_onnx(stem, blocks, head_layers(np.random.default_rng(1)), pool_top=4)])
    with pytest.raises(ValueError, match="at least two"):
        soup_weights([a])


@pytest.fixture
def soup_ingredients(settings: Settings, tmp_path: Path) -> tuple[list[Path], Path, Path]:
    """Two 'fine-tuned' models of one split (heads from other seeds), their photo folders."""
    clean = fake_photo_dir(tmp_path / "clean", 4, seed=3)
    extra = fake_photo_dir(tmp_path / "extra", 2, seed=4)
    calib = sorted(sha256_file(f) for f in (clean / "p3.jpg", extra / "p1.jpg"))
    stem, blocks = pretrained_body(settings)
    config = {**FinetuneConfig(size=64).__dict__, "retired_knob": 1}  # a knob this version no longer has
    dirs = []
    for k in range(2):
        meta = {"version": f"wmcnn-{k}", "cnn_version": CNN_VERSION, "input_size": 64, "threshold": 0.5,
                "config": config, "training": {"init": None}, "calibration_photos_sha256": calib,
                "train_photos_sha256": [*calib, f"train-{k}"]}
        CnnDetector.save(tmp_path / f"run{k}", export_onnx(stem, blocks, head_layers(np.random.default_rng(k))), meta)
        dirs.append(tmp_path / f"run{k}")
    return dirs, clean, extra


def test_soup_averages_runs_and_recalibrates_on_their_calibration_photos(
        settings: Settings, soup_ingredients: tuple[list[Path], Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from mining.cli import main
    from mining.finetune import soup, soup_weights

    dirs, clean, extra = soup_ingredients
    report = soup(settings, dirs, clean, out=tmp_path / "soup", extra_clean=[extra])
    det = CnnDetector.load(tmp_path / "soup")
    meta = det.meta
    assert report.calibration_photos == 2 and report.ingredients == ["wmcnn-0", "wmcnn-1"]
    assert det.version == report.version != "wmcnn-0" and det.threshold == report.threshold
    assert (tmp_path / "soup" / "model.onnx").read_bytes() == soup_weights(
        [(d / "model.onnx").read_bytes() for d in dirs])
    assert set(meta["train_photos_sha256"]) >= {"train-0", "train-1"}  # evaluate skips what any run saw
    assert len(meta["calibration"]["scores"]) == 2 * 16 and [s["version"] for s in meta["soup"]] == report.ingredients
    # Without the folder that holds one calibration photo the threshold cannot be set: refused, nothing written.
    with pytest.raises(ValueError, match="1 of the 2 calibration photos"):
        soup(settings, dirs, clean, out=tmp_path / "partial")
    assert not (tmp_path / "partial").exists()
    assert main(["watermark", "soup", str(dirs[0]), str(dirs[1]), "--clean", str(clean),
                 "--extra-clean", str(extra), "--out", str(tmp_path / "cli")]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == report.version
    assert main(["watermark", "soup", str(dirs[0]), "--clean", str(clean)]) == 2
    assert main(["watermark", "soup", str(dirs[0]), str(tmp_path), "--clean", str(clean)]) == 1
    assert f"{tmp_path} is not a fine-tuned model folder" in capsys.readouterr().err


def test_soup_refuses_runs_of_another_split_or_start(settings: Settings,
                                                     soup_ingredients: tuple[list[Path], Path, Path]) -> None:
    from mining.finetune import soup

    dirs, clean, extra = soup_ingredients
    meta = json.loads((dirs[1] / "meta.json").read_text())
    for change, match in [({"config": {**meta["config"], "seed": 1}}, "config seed"),
                          ({"calibration_photos_sha256": ["other"]}, "calibration_photos_sha256"),
                          ({"training": {"init": "/models/old"}}, "other weights")]:
        (dirs[1] / "meta.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(ValueError, match=match):
            soup(settings, dirs, clean, extra_clean=[extra])
