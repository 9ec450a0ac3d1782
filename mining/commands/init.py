"""`mining init --liked DIR`: bootstrap the gallery and the first taste model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="turn a folder of liked images into the gallery (re-run adds new files only)")
    p.add_argument("--liked", required=True, type=Path, help="folder of images the person likes")
    p.add_argument("--no-watermark-training", action="store_true",
                   help="do not train the watermark detector on the liked images")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mining.gallery import init_gallery
    from mining.settings import load_settings

    result = init_gallery(load_settings(), args.liked, train_watermark=not args.no_watermark_training)
    print(json.dumps(result.as_dict(), default=str, indent=2))
    return 0
