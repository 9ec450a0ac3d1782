"""`mining report`, `mining discover`, `mining watch`: the weekly report and the watch list it steers."""

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
    w = sub.add_parser("watch", help="show or edit the watch list in the warehouse (the hourly DAGs read it)")
    w.add_argument("action", choices=("list", "add", "remove"))
    w.add_argument("subreddits", nargs="*", help="names, with or without r/")
    w.add_argument("--note", help="why (kept in the watch_list table)")
    w.set_defaults(func=_watch)


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


def _watch(args: argparse.Namespace) -> int:
    import sys

    from mining.settings import load_settings
    from mining.warehouse import Warehouse

    settings = load_settings()
    if args.action != "list" and not args.subreddits:
        print(f"mining watch {args.action}: name at least one subreddit", file=sys.stderr)
        return 2
    with Warehouse.open(settings, read_only=args.action == "list") as wh:
        for name in args.subreddits:
            if args.action == "add":
                wh.add_to_watch_list(name, added_by="user", note=args.note)
            elif not wh.set_watch_active(name, False, note=args.note):
                print(f"mining watch remove: r/{name} is not on the watch list", file=sys.stderr)
                return 1
        rows = wh.rows("SELECT subreddit, active, added_by, strftime(added_at, '%Y-%m-%dT%H:%MZ') AS added_at, "
                       "note FROM watch_list ORDER BY NOT active, added_at, subreddit")
    for r in rows:
        print(json.dumps(r))
    return 0
