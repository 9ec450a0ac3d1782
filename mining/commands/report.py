"""`mining report` and `mining discover`: the weekly source report and watch-list proposals."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write the weekly source report (HTML, Markdown, JSON, DuckDB tables)")
    p.add_argument("--week", help="ISO week such as 2026-W47 (UTC); default: the last complete week")
    p.add_argument("--discover", action="store_true", help="refresh the week's discovery proposals first")
    p.set_defaults(func=_report)
    d = sub.add_parser("discover", help="propose subreddits seen via r/all for the watch list (and barren removals)")
    d.add_argument("--week", help="ISO week such as 2026-W47 (UTC); default: the last complete week")
    d.add_argument("--auto-promote", action="store_true", default=None,
                   help="promote qualifying subreddits within the weekly limits (MINING_DISCOVERY_AUTO_PROMOTE)")
    d.set_defaults(func=_discover)


def _report(args: argparse.Namespace) -> int:
    from mining.report import build_report, last_complete_week
    from mining.settings import load_settings

    settings = load_settings()
    week = args.week or last_complete_week()
    if args.discover:
        from mining.discovery import propose

        propose(settings, week)
    result = build_report(settings, week)
    print(json.dumps(result.as_dict(), indent=2))
    return 0


def _discover(args: argparse.Namespace) -> int:
    from mining.discovery import propose
    from mining.report import last_complete_week
    from mining.settings import load_settings

    overrides = {"discovery_auto_promote": True} if args.auto_promote else {}
    settings = load_settings(**overrides)
    for p in propose(settings, args.week or last_complete_week()):
        print(json.dumps(p.as_dict()))
    return 0
