"""``mining scrape`` (one interval's listings) and ``mining collect`` (the light collector)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mining.commands._common import add_interval_args, interval_from, settings_from
from mining.listings import collect, scrape_interval
from mining.reddit import RedditError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("scrape", help="fetch the interval's posts from every source into the lake")
    add_interval_args(p)
    p.set_defaults(func=run_scrape)
    c = subparsers.add_parser("collect", help="poll high-volume sources' newest posts (run every few minutes)")
    c.add_argument("--source", action="append", dest="sources",
                   help="source to poll (repeatable); default MINING_COLLECTOR_SOURCES")
    c.set_defaults(func=run_collect)


def _emit(summary: dict[str, object]) -> None:
    print(json.dumps(summary, sort_keys=True))


def run_scrape(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    try:
        result = scrape_interval(settings, interval_from(args))
    except RedditError as exc:
        print(f"mining scrape: {exc}", file=sys.stderr)
        return 1
    _emit(result.as_dict())
    return 0


def run_collect(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    try:
        result = collect(settings, sources=args.sources)
    except RedditError as exc:
        print(f"mining collect: {exc}", file=sys.stderr)
        return 1
    _emit(result.as_dict())
    return 0
