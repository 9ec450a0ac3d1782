"""`mining run`: the whole hourly pipeline for an interval, without Airflow."""

from __future__ import annotations

import argparse
import json

from mining.commands._common import add_interval_args, interval_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the hourly steps (scrape..publish) for an interval, without Airflow")
    add_interval_args(p)
    p.add_argument("--steps", default="scrape,download,embed,score,load,publish",
                   help="comma-separated subset of the hourly steps, in order")
    p.add_argument("--dry-run", action="store_true", help="score and record, publish nothing")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mining.pipeline import run_interval, settings_for_run

    settings = settings_for_run({"dry_run": True} if args.dry_run else {})
    interval = interval_from(args)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    for result in run_interval(settings, interval, steps):
        print(json.dumps(result.as_dict()))
    return 0
