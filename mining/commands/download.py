"""``mining download``: resolve, pre-filter and download one interval's images."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mining.commands._common import add_interval_args, interval_from, settings_from
from mining.download import download_interval


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("download", help="resolve the interval's posts to images and download them safely")
    add_interval_args(p)
    p.set_defaults(func=run_download)


def run_download(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    try:
        result = download_interval(settings, interval_from(args))
    except FileNotFoundError as exc:
        print(f"mining download: {exc}", file=sys.stderr)
        return 1
    summary = result.as_dict()
    counts = dict(result.counts)
    summary["total"] = counts.pop("candidates", 0)
    summary["counts"] = dict(sorted(counts.items()))
    print(json.dumps(summary, sort_keys=True))
    return 0
