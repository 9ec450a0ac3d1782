"""``mining embed``: embed one interval's downloaded images into the lake."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mining.commands._common import add_interval_args, interval_from, settings_from
from mining.embed import embed_interval
from mining.models import ModelError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("embed", help="embed the interval's downloaded images (embeddings partition)")
    add_interval_args(p)
    p.add_argument("--batch-size", type=int, help="images per inference batch (MINING_EMBED_BATCH_SIZE)")
    p.set_defaults(func=run_embed)


def run_embed(args: argparse.Namespace) -> int:
    settings = settings_from(args, embed_batch_size=args.batch_size)
    try:
        result = embed_interval(settings, interval_from(args))
    except ModelError as exc:
        print(f"mining embed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.as_dict(), sort_keys=True))
    return 0
