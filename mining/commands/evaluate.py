"""``mining evaluate``: held-out AUROC, recall and acceptance of every taste model on two folders."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mining.commands._common import settings_from
from mining.settings import PROJECT_ROOT


def _shared_photos() -> Path:
    shared = Path(os.environ.get("MINING_SHARED_DIR", PROJECT_ROOT.parent / "shared"))
    return shared / "data" / "photos"


def register(subparsers: argparse._SubParsersAction) -> None:
    photos = _shared_photos()
    p = subparsers.add_parser(
        "evaluate", help="evaluate the novelty (taste) models on a liked folder vs an other folder",
        description="Embeds both folders, runs a held-out k-fold evaluation of each novelty model kind and of the "
                    "automatic choice, and prints a Markdown table and JSON.")
    p.add_argument("--liked", type=Path, default=photos / "scenery", help="folder of liked images (default: %(default)s)")
    p.add_argument("--other", type=Path, default=photos / "other",
                   help="folder of other images, the unlabelled stream / negatives (default: %(default)s)")
    p.add_argument("--folds", type=int, default=5, help="outer folds (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-recall", type=float, help="override MINING_NOVELTY_TARGET_RECALL")
    p.add_argument("--target-acceptance", type=float, help="override MINING_NOVELTY_TARGET_ACCEPTANCE")
    p.add_argument("--cache", type=Path, help="npz to reuse embeddings from (written when missing or stale)")
    p.add_argument("--format", choices=("both", "markdown", "json"), default="both")
    p.add_argument("--json-out", type=Path, help="also write the JSON report to this file")
    p.add_argument("--min-auroc", type=float, default=None,
                   help="exit 1 when the chosen model's held-out AUROC is below this (e.g. 0.95)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mining.evaluate import AUTO, evaluate_dirs

    settings = settings_from(args, novelty_target_recall=args.target_recall,
                             novelty_target_acceptance=args.target_acceptance)
    for name, folder in (("--liked", args.liked), ("--other", args.other)):
        if not folder.is_dir():
            print(f"mining evaluate: {name} {folder} is not a directory", file=sys.stderr)
            return 2
    report = evaluate_dirs(settings, args.liked, args.other, seed=args.seed, folds=args.folds, cache=args.cache)
    if args.format in ("both", "markdown"):
        print(report.to_markdown())
    if args.format == "both":
        print()
    if args.format in ("both", "json"):
        print(report.to_json())
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(report.to_json())
    chosen = report.row(AUTO).auroc
    if args.min_auroc is not None and chosen < args.min_auroc:
        print(f"mining evaluate: chosen model's held-out AUROC {chosen:.3f} < {args.min_auroc}", file=sys.stderr)
        return 1
    return 0
