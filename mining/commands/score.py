"""`mining score`: score image files, or (with --start) an interval of the lake."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score image files/folders (JSON lines), or an interval with --start/--end")
    p.add_argument("paths", nargs="*", type=Path, help="image files or folders")
    p.add_argument("--start", help="score the lake's candidates for this interval instead")
    p.add_argument("--end")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mining.settings import load_settings

    settings = load_settings()
    if args.start:
        from mining.lake import Interval
        from mining.score import score_interval

        print(json.dumps(score_interval(settings, Interval.parse(args.start, args.end)).as_dict()))
        return 0
    if not args.paths:
        print("mining score: give image paths or --start", file=sys.stderr)
        return 2
    from mining.score_files import score_files

    for line in score_files(settings, args.paths):
        print(json.dumps(line), flush=True)
    return 0
