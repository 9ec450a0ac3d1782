"""Torch tier: fine-tuning the watermark CNN, and the export computing what torch trained.

Run with ``bash .ci/torch-tier.sh`` (creates .venv-torch with torch 2.13 CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onnxruntime as ort  # noqa: E402
from fake_photos import fake_photo, fake_photo_dir  # noqa: E402

from mining.finetune import (  # noqa: E402
    FROZEN,
    FinetuneConfig,
    export_onnx,
    finetune,
    fit,
    head_layers,
    pretrained_body,
    rank_loss,
    to_input,
    torch_model,
)
from mining.lake import sha256_file  # noqa: E402
from mining.settings import Settings, load_settings  # noqa: E402
from mining.watermark import CnnDetector, cnn_dir, evaluate, list_images, load_detector, split_files  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.mark.parametrize(("pool_top", "rank_weight"), [(1, 0.0), (4, 1.0)])
def test_export_computes_what_torch_trained(pool_top: int, rank_weight: float) -> None:
    stem, blocks = pretrained_body(load_settings(env={}))
    model = torch_model(stem, blocks, head_layers(np.random.default_rng(0)), pool_top=pool_top)
    rng = np.random.default_rng(1)
    bases = [fake_photo(rng, 400, 300) for _ in range(2)]
    before = [c.weight.detach().clone() for c in model.convs]
    losses = fit(model, bases, FinetuneConfig(steps=2, batch=2, size=128, warmup=1, pool_top=pool_top,
                                                 rank_weight=rank_weight))
    assert len(losses) == 1 and np.isfinite(losses[0])
    changed = [not torch.equal(b, c.weight) for b, c in zip(before, model.convs, strict=True)]
    frozen = 1 + sum(len(b.convs) for b in blocks[:FROZEN])
    assert not any(changed[:frozen]) and all(changed[frozen:]), "the stem and first blocks stay; the rest trains"
    x = rng.integers(0, 256, (3, 200, 330, 3), dtype=np.uint8)  # odd size: SAME padding on both sides
    with torch.no_grad():
        want = model(torch.from_numpy(to_input(x))).numpy()
    sess = ort.InferenceSession(export_onnx(*model.trained_layers(), pool_top=pool_top),
                                providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": to_input(x)})[0][:, 0]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_rank_loss_charges_the_pairs_out_of_order() -> None:
    y = torch.tensor([1.0, 1.0, 0.0, 0.0])
    in_order = rank_loss(torch.tensor([5.0, 4.0, -4.0, -5.0]), y)
    tied = rank_loss(torch.zeros(4), y)
    reversed_ = rank_loss(torch.tensor([-5.0, -4.0, 4.0, 5.0]), y)
    assert float(in_order) < 1e-3 and abs(float(tied) - np.log(2)) < 1e-6 and float(reversed_) > 8
    # one misordered pair among four: only it is charged, so the gradient lands on its two images
    logits = torch.tensor([5.0, -3.0, -4.0, -2.0], requires_grad=True)
    rank_loss(logits, y).backward()
    assert logits.grad is not None
    assert abs(float(logits.grad[0])) < 0.01 and float(logits.grad[1]) < -0.1 and float(logits.grad[3]) > 0.1
    one_class = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = rank_loss(one_class, torch.ones(2))
    loss.backward()  # a batch of one label still trains the other losses
    assert float(loss.detach()) == 0.0


def test_finetune_installs_a_calibrated_cnn_that_evaluate_measures_on_unseen_photos(
        settings: Settings, tmp_path: Path) -> None:
    settings = settings.replace(models_dir=tmp_path / "models")
    clean = fake_photo_dir(tmp_path / "clean", 9, seed=2)
    config = FinetuneConfig(steps=3, batch=2, size=128, warmup=1, holdout=0.34, calibration=0.34)
    report = finetune(settings, clean, config=config)
    assert report.train_photos == 4 and report.calibration_photos == 2 and len(report.held_out_photos) == 3
    assert 0 < report.threshold < 1 and len(report.losses) == 1
    meta = json.loads((cnn_dir(settings) / "meta.json").read_text())
    assert meta["version"] == report.version and meta["threshold"] == report.threshold
    assert len(meta["train_photos_sha256"]) == 6
    assert not {sha256_file(Path(p)) for p in report.held_out_photos} & set(meta["train_photos_sha256"])
    det = load_detector(settings)
    assert isinstance(det, CnnDetector) and det.threshold == report.threshold and det.input_size == 128
    result = evaluate(settings, clean, n_per_image=2, neg_per_image=1)
    assert result.excluded_training_photos == 6 and result.photos == 3 and result.detector == report.version


def test_extra_clean_photos_and_warm_starts_never_move_the_held_out_set(
        settings: Settings, tmp_path: Path) -> None:
    settings = settings.replace(models_dir=tmp_path / "models")
    clean = fake_photo_dir(tmp_path / "clean", 9, seed=2)
    extra = fake_photo_dir(tmp_path / "extra", 5, seed=3)
    config = FinetuneConfig(steps=1, batch=2, size=128, warmup=1, holdout=0.34, calibration=0.34)
    report = finetune(settings, clean, config=config, extra_clean=[extra])
    assert report.held_out_photos == [str(p) for p in split_files(list_images(clean), 0.34, 0)[1]]
    assert report.train_photos + report.calibration_photos == 6 + 5
    seen = set(json.loads((cnn_dir(settings) / "meta.json").read_text())["train_photos_sha256"])
    assert {sha256_file(p) for p in list_images(extra)} <= seen
    # Warm start from that model, on the clean folder alone: what it had seen stays listed as seen.
    warm = finetune(settings.replace(models_dir=tmp_path / "warm"), clean, config=config, init=cnn_dir(settings))
    warm_meta = json.loads((Path(warm.path) / "meta.json").read_text())
    assert set(warm_meta["train_photos_sha256"]) == seen and warm_meta["training"]["init"] == str(cnn_dir(settings))
    # Another split (seed): photos the first model trained on never calibrate the second's threshold.
    reseeded = finetune(settings.replace(models_dir=tmp_path / "reseeded"), clean, extra_clean=[extra],
                        config=FinetuneConfig(steps=1, batch=2, size=128, warmup=1, holdout=0.34, calibration=0.34,
                                              seed=5), init=cnn_dir(settings))
    first = json.loads((cnn_dir(settings) / "meta.json").read_text())
    trained_by_first = set(first["train_photos_sha256"]) - set(first["calibration_photos_sha256"])
    calibrated = json.loads((Path(reseeded.path) / "meta.json").read_text())["calibration_photos_sha256"]
    assert calibrated and not set(calibrated) & trained_by_first
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        finetune(settings, clean, config=config, extra_clean=[tmp_path / "empty"])
