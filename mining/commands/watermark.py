"""`mining watermark train|finetune|soup|evaluate|predict`: build and measure the watermark detector."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mining.finetune import FinetuneConfig as FinetuneDefaults
from mining.settings import load_settings
from mining.watermark import DEFAULT_MAX_FPR, DEFAULT_TARGET_FPR


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("watermark", help="train, evaluate or run the watermark detector")
    sub = p.add_subparsers(dest="watermark_command", metavar="ACTION", required=True)

    t = sub.add_parser("train", help="train the default detector on synthetic watermarks over clean photos")
    t.add_argument("--clean", type=Path, required=True, help="folder of clean (unwatermarked) photos")
    t.add_argument("--out", type=Path, help="output folder (default: <models_dir>/watermark)")
    t.add_argument("--per-image", type=int, default=8, help="watermarked examples per photo (default 8)")
    t.add_argument("--clean-per-image", type=int, default=4, help="clean augmented copies per photo (default 4)")
    t.add_argument("--holdout", type=float, default=0.0,
                   help="fraction of photos (per folder) kept out of training for `evaluate` (default 0)")
    t.add_argument("--target-fpr", type=float, default=DEFAULT_TARGET_FPR,
                   help="false-positive rate the threshold aims at")
    t.add_argument("--max-fpr", type=float, default=DEFAULT_MAX_FPR,
                   help="false-positive rate it must keep under in 80%% of photo resamples (from 20 photos up)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_train)

    f = sub.add_parser("finetune", help="fine-tune the watermark CNN (needs torch; runs on onnxruntime after)")
    f.add_argument("--clean", type=Path, required=True, help="folder of clean (unwatermarked) photos")
    f.add_argument("--out", type=Path, help="output folder (default: <models_dir>/watermark-cnn)")
    f.add_argument("--steps", type=int, default=FinetuneDefaults.steps,
                   help=f"training batches (default {FinetuneDefaults.steps}: about an hour on 2 CPU cores)")
    f.add_argument("--batch", type=int, default=FinetuneDefaults.batch)
    f.add_argument("--holdout", type=float, default=0.0,
                   help="fraction of photos (per folder) kept out of training and calibration for `evaluate`")
    f.add_argument("--calibration", type=float, default=FinetuneDefaults.calibration,
                   help="fraction of the other photos used only to calibrate the threshold")
    f.add_argument("--extra-clean", type=Path, action="append", default=[], metavar="DIR",
                   help="more clean photos, never held out (repeatable): variety for training and calibration")
    f.add_argument("--init", type=Path, metavar="DIR",
                   help="start from this fine-tuned model's weights (e.g. models/watermark-cnn) instead of afresh")
    f.add_argument("--lr", type=float, default=FinetuneDefaults.lr, help="peak learning rate of the head")
    f.add_argument("--size", type=int, default=FinetuneDefaults.size,
                   help="input size it trains and serves at (multiple of 32; smaller is faster and sees less)")
    f.add_argument("--scene-text", type=float, default=FinetuneDefaults.scene_text,
                   help="share of examples given a sign, page or label that is part of the scene (a clean feature)")
    f.add_argument("--photo-aug", type=float, default=FinetuneDefaults.photo_aug, metavar="SHARE",
                   help="share of examples whose photo is first randomly cropped and recoloured (default %(default)s)")
    f.add_argument("--rank-weight", type=float, default=FinetuneDefaults.rank_weight, metavar="W",
                   help="weight of a pairwise ranking loss between watermarked and clean images (default %(default)s: none)")
    f.add_argument("--frozen", type=int, default=FinetuneDefaults.frozen, metavar="N",
                   help="blocks kept at their pretrained weights (fewer: slower steps, more to fit)")
    f.add_argument("--pool-top", type=int, default=FinetuneDefaults.pool_top, metavar="K",
                   help="the image's logit is the mean of its K highest 16-px cells (1: the highest alone)")
    f.add_argument("--target-fpr", type=float, default=FinetuneDefaults.target_fpr,
                   help="false-positive aim on the calibration photos")
    f.add_argument("--max-fpr", type=float, default=FinetuneDefaults.max_fpr,
                   help="false-positive rate the threshold must keep under on photos like them ...")
    f.add_argument("--fpr-confidence", type=float, default=FinetuneDefaults.fpr_confidence,
                   help="... in this share of photo resamples (a few dozen calibration photos are a noisy sample)")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=_finetune)

    s = sub.add_parser("soup", help="average fine-tuned CNNs of one start and split into one model, then "
                                     "recalibrate (no torch)")
    s.add_argument("models", nargs="+", type=Path, metavar="MODEL_DIR",
                   help="fine-tuned model folders (two or more), trained with the same --seed and split")
    s.add_argument("--clean", type=Path, required=True, help="the --clean folder they trained with")
    s.add_argument("--extra-clean", type=Path, action="append", default=[], metavar="DIR",
                   help="the --extra-clean folders they trained with (their calibration photos are found there)")
    s.add_argument("--out", type=Path, help="output folder (default: <models_dir>/watermark-cnn)")
    s.set_defaults(func=_soup)

    e = sub.add_parser("evaluate", help="AUROC, false positives and per-kind recall on held-out photos")
    e.add_argument("--clean", type=Path, required=True, help="folder of clean photos (training photos are skipped)")
    e.add_argument("--per-image", type=int, default=8)
    e.add_argument("--clean-per-image", type=int, default=4)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", action="store_true", help="print the report as JSON instead of Markdown")
    e.set_defaults(func=_evaluate)

    r = sub.add_parser("predict", help="print one JSON line per image: path, watermark_prob, watermarked")
    r.add_argument("paths", nargs="+", type=Path)
    r.set_defaults(func=_predict)


def _progress(done: int, total: int) -> None:
    if done == total or done % 10 == 0:
        print(f"  {done}/{total} photos", file=sys.stderr, flush=True)


def _train(args: argparse.Namespace) -> int:
    from mining.watermark import train

    report = train(load_settings(), args.clean, out=args.out, n_per_image=args.per_image,
                   neg_per_image=args.clean_per_image, seed=args.seed, holdout=args.holdout,
                   target_fpr=args.target_fpr, max_fpr=args.max_fpr,
                   progress=_progress)
    summary = report.as_dict()
    summary["held_out_photos"] = len(report.held_out_photos)
    print(json.dumps(summary, indent=2))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from mining.finetune import FinetuneConfig, TorchMissing, finetune

    config = FinetuneConfig(steps=args.steps, batch=args.batch, holdout=args.holdout, calibration=args.calibration,
                            target_fpr=args.target_fpr, max_fpr=args.max_fpr,
                            fpr_confidence=args.fpr_confidence, seed=args.seed, lr=args.lr,
                            size=args.size, scene_text=args.scene_text, pool_top=args.pool_top, frozen=args.frozen,
                            photo_aug=args.photo_aug, rank_weight=args.rank_weight)

    def progress(step: int, steps: int, loss: float) -> None:
        print(f"  step {step}/{steps} loss {loss:.3f}", file=sys.stderr, flush=True)

    try:
        report = finetune(load_settings(), args.clean, out=args.out, config=config, progress=progress,
                          extra_clean=args.extra_clean, init=args.init)
    except TorchMissing as exc:
        print(f"mining: {exc}", file=sys.stderr)
        return 1
    summary = report.as_dict()
    summary["held_out_photos"] = len(report.held_out_photos)
    print(json.dumps(summary, indent=2))
    return 0


def _soup(args: argparse.Namespace) -> int:
    from mining.finetune import soup

    if len(args.models) < 2:
        print("mining: a soup needs at least two model folders", file=sys.stderr)
        return 2
    try:
        report = soup(load_settings(), args.models, args.clean, out=args.out, extra_clean=args.extra_clean)
    except ValueError as exc:  # ingredients that do not mix, or calibration photos not found
        print(f"mining: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report.as_dict(), indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from mining.watermark import evaluate

    report = evaluate(load_settings(), args.clean, n_per_image=args.per_image, neg_per_image=args.clean_per_image,
                      seed=args.seed, progress=_progress)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.markdown())
    return 0


def _predict(args: argparse.Namespace) -> int:
    from mining.watermark import list_images, load_detector

    detector = load_detector(load_settings())
    if detector is None:
        print("mining: no watermark detector: run `mining watermark train --clean DIR`", file=sys.stderr)
        return 1
    files: list[Path] = []
    for p in args.paths:
        files.extend(list_images(p) if p.is_dir() else [p])
    probs = detector.predict_paths(files)
    for path, prob in zip(files, probs, strict=True):
        if prob != prob:  # NaN: unreadable
            print(json.dumps({"path": str(path), "error": "unreadable image"}))
        else:
            print(json.dumps({"path": str(path), "watermark_prob": round(float(prob), 4),
                              "watermarked": bool(prob >= detector.threshold), "detector": detector.version}))
    return 0
